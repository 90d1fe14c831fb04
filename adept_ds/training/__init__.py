"""Stage 2 and after: the DeepSpeed engine (the only place it is initialised for training), unit importance and
learning rates, validation and the forgetting guard, checkpoints, universal resume, and the Hugging Face export."""
