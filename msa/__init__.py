"""MSA (Multi-Scale Alignment) remote-sensing image-text retrieval: model library."""
