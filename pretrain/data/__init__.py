"""Data at training time: shard streams, their decoding and batching.

`build` makes a rank's loader from `data.*`; `shards` streams webdataset shards through fsspec;
`tokens` and `images` define the two sample formats and decode them; `loader` batches them in
worker processes. Offline preparation of the shards is `pretrain.prepare`.
"""
