"""The miniature world: a CPU-trainable step-distilled model with an in-context multimodal encoder.

world   – procedural renderer with ground truth, vocabulary, held-out concepts/domain, dataset writers
nets    – small multimodal encoder + single-stream DiT (x-prediction)
recipe  – pretrain the base with in-context examples, then distil the 4-step turbo
metrics – attribute decoding, concept fidelity, few-step quality, drift, sharpness
The adapter for the rest of the project is `dopsd.mini.adapter`.
"""
