"""Tasks: translation, ELECTRA pretraining, GLUE fine-tuning."""
