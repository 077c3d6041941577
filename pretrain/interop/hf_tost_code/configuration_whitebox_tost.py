"""The configuration of a ToST language model exported by whitebox-pretrain (tools/convert.py
export-hf): the fields of its model config, under the names the model code uses."""

from transformers import PretrainedConfig


class ToSTConfig(PretrainedConfig):
    model_type = "whitebox_tost"

    def __init__(
        self,
        vocab_size=50304,
        n_layer=12,
        n_head=12,
        n_embd=768,
        seq_len=1024,
        bias=False,
        layerscale_init=None,
        dropout=0.0,
        norm_eps=1e-5,
        gelu_approximate="none",
        tie_word_embeddings=True,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.seq_len = seq_len
        self.bias = bias
        self.layerscale_init = layerscale_init
        self.dropout = dropout
        self.norm_eps = norm_eps
        self.gelu_approximate = gelu_approximate
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
