"""Train an N:M-sparse Swin / Swinv2 image classifier with the Hugging Face Trainer.

    accelerate launch recipes/train_swin.py                      # embedded default (digits, CPU ok)
    accelerate launch recipes/train_swin.py recipes/configs/swinv2_b_imagenet_mdgf_1of32.yaml

Same arguments as recipes/train_vit.py (see README.md).
"""

from nmsparse_hf.recipe import run

if __name__ == "__main__":
    run(family="swin")
