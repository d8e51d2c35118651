"""Train an N:M-sparse Swin / Swinv2 image classifier with the Hugging Face Trainer.

    accelerate launch recipes/train_swin.py                    # embedded default (digits, CPU ok)
    accelerate launch recipes/train_swin.py swin_digits.yaml --model_config swinv2-digits
    accelerate launch recipes/train_swin.py --config swinv2_b_imagenet_mdgf_exp_1of32.yaml
    python recipes/train_swin.py --help                        # every flag, with this run's defaults

A config is a path or the name of a shipped one (nmsparse_hf/recipes/configs/: swin_digits.yaml,
swinv2_b_imagenet_mdgf_exp_1of32.yaml). Same arguments as recipes/train_vit.py (see docs/RECIPES.md).
"""

from nmsparse_hf.recipes.image_classification import cli

if __name__ == "__main__":
    cli(family="swin")
