"""Images: what a data set is (``dataset.find_images``: the two layouts, splitting, the content
fingerprint ``dataset.data_fingerprint``), how it is read (``loader.ImageLoader``: decode with EXIF,
resize, augment, batch; ``loader.predict``) and generated sets for the demo and the tests
(``synthetic.write_kaggle_dataset``).
"""
