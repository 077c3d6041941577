"""Offline preparation: inputs -> webdataset shards with an index, once, before training.

`writer` is the one resumable shard writer; `parallel` the ordered process pool; `text` and
`documents` turn text files into token-block shards; `images` turns image files into labelled
image shards; `embedded` builds the two defaults that need no user data (the stdlib corpus and
the digits). What runs in every loader worker at training time lives in `pretrain.data`.
"""
