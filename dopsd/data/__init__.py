"""Datasets: folders of image + caption pairs in the layouts users have (dataset), scanned (scan), each image
read or refused by name (image_files), every problem and what training will do to the data reported at once
(checks)."""
