"""Naming segments with words: a vocabulary's cross-attention scores segments (`vocabulary`); BLIP captions give an
image its own words (`captioning`)."""
