"""bigjax: pretrain and fine-tune large models on device meshes with JAX and Flax."""
