"""Train an N:M-sparse ViT image classifier with the Hugging Face Trainer.

    accelerate launch recipes/train_vit.py                     # embedded default (digits, CPU ok)
    accelerate launch recipes/train_vit.py --config vit_b16_imagenet_mdgf_exp_1of32.yaml
    accelerate launch recipes/train_vit.py vit_digits.yaml --m 4 --max_steps 100   # flags win
    accelerate launch recipes/train_vit.py --model_name_or_path google/vit-base-patch16-224 \\
        --ignore_mismatched_sizes true --dataset_name ILSVRC/imagenet-1k --streaming true \\
        --max_steps 10000 --n_keep 2 --m 4 --locations FF,QKV
    python recipes/train_vit.py --help                         # every flag, with this run's defaults

A config is a path or the name of a shipped one (nmsparse_hf/recipes/configs/: vit_digits.yaml,
vit_b16_imagenet_mdgf_exp_1of32.yaml, vit_b16_seed_style.yaml); it may use our keys or the seed
research code's timm YAML keys. See docs/RECIPES.md.
"""

from nmsparse_hf.recipes.image_classification import cli

if __name__ == "__main__":
    cli(family="vit")
