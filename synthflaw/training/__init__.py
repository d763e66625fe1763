"""Training: the Trainer-based scaffold every training stage and unlearning share, packed pre-training and CPT,
assistant-only SFT, JSON jobs and their launch on several processes."""
