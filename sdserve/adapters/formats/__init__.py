"""LoRA file layouts: each parser turns one layout's keys into RawPairs keyed by target name."""
