"""Trained models outside training: load one from a run, a checkpoint or an exported folder (`loading`),
and export it as a transformers folder (`export`: architectures in `architectures`, tokenizer files in
`tokenizer_files`, the remote code of our own architecture in `remote/`)."""
