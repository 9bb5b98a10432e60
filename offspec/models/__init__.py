"""Architecture adapters: build transformers' own decoder modules on the meta device and feed them weights."""
