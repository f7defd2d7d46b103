"""The offline lab: synthetic verifiable reasoning tasks, a locally built tokenizer,
and tiny Hugging Face models trained on CPU (DESIGN.md §4)."""
