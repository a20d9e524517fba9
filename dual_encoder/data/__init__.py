"""Datasets: sources of image–caption pairs, the synthetic generator, TFRecords and tf.data pipelines."""
