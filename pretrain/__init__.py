"""whitebox-pretrain: distributed pretraining for white-box transformers."""
