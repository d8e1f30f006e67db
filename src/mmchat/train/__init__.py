"""Training: pretraining from scratch, supervised fine-tuning on chats (full or LoRA), export."""
