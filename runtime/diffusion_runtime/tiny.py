"""Random-weight pipelines small enough for CPU tests, built fully offline: FluxPipeline (images),
WanPipeline (text-to-video, variant `wan-tiny`) and WanImageToVideoPipeline (image-to-video, variant
`wan-i2v-tiny`).

Every component is a real diffusers/transformers class with a tiny config; the tokenizers are built
from vocabularies written here (no hub access). `write_tiny_model(dir)` saves it with
`save_pretrained`, so the runtime loads it through the same `from_pretrained` path as a real model.
Weights come from a seeded generator, so the same variant always yields the same files.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinySpec:
    num_layers: int  # double-stream (joint) blocks
    num_single_layers: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_dim: int  # T5 d_model == joint_attention_dim
    clip_dim: int  # CLIP hidden == pooled_projection_dim
    vae_channels: tuple[int, ...]
    latent_channels: int
    max_sequence_length: int


SPECS = {
    # a few seconds per 64x64 image on one CPU core
    "tiny": TinySpec(2, 4, 2, 16, (4, 6, 6), 32, 32, (8, 8, 8, 8), 4, 32),
    # heavier transformer so that cached steps dominate the time (benchmarks)
    "small": TinySpec(4, 8, 4, 64, (16, 24, 24), 256, 64, (16, 16, 16, 16), 4, 64),
    # "tiny" with 4 heads of 8: divisible by ulysses_size x tp_size = 2 x 2 (hybrid parallel tests)
    "tiny-heads4": TinySpec(2, 4, 4, 8, (2, 2, 4), 32, 32, (8, 8, 8, 8), 4, 32),
}
# WanPipeline (text-to-video): a 2-block WanTransformer3DModel, a 2-layer UMT5, the Wan VAE at base_dim 3;
# WanImageToVideoPipeline (image-to-video): the same parts in Wan 2.1 I2V's layout (36 input channels:
# 16 noise + 4 first-frame mask + 16 image latents; image cross-attention) plus a 2-layer CLIP vision
# encoder and its image processor, both from configs
WAN_I2V_VARIANT = "wan-i2v-tiny"
WAN_VARIANTS = ("wan-tiny", WAN_I2V_VARIANT)
VARIANTS = tuple(SPECS) + WAN_VARIANTS
WAN_MAX_SEQUENCE_LENGTH = 32
WAN_I2V_IMAGE_DIM = 16  # the tiny CLIP vision encoder's hidden size (Wan 2.1 I2V: ViT-H/14, 1280)
WAN_I2V_CLIP_SIZE = 32  # its input size, patches of 8: 16 image tokens (Wan 2.1 I2V: 224, 257 tokens)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-unicode table (same algorithm as the CLIP tokenizer)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP BPE: every byte symbol (alone and word-final), a few merges of frequent pairs."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = []
    for a, b in ("th", "he", "in", "an", "er", "on", "at", "ca", "ph", "ot"):
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    for a, b in ("ca", "ph", "ot"):
        merges.append((a, b + "</w>"))
        vocab.setdefault(a + b + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram vocab for T5Tokenizer: specials, word-start pieces, single characters."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab.append(("▁", -2.0))
    for c in chars:
        vocab.append(("▁" + c, -3.0))
    for c in chars:
        vocab.append((c, -4.0))
    for w in ("a", "the", "of", "photo", "cat", "dog", "red", "blue", "in", "on"):
        vocab.append(("▁" + w, -1.0))
    return vocab


def build_tiny_wan_pipeline(seed: int = 0, image_to_video: bool = False):
    """The random-weight WanPipeline (float32): diffusers' own test shapes for Wan 2.1 (patch 1x2x2,
    16 latent channels, temporal VAE factor 4, spatial 8), a UMT5 encoder and a T5 unigram tokenizer.
    `image_to_video`: WanImageToVideoPipeline in Wan 2.1 I2V's layout (Wan2.1-I2V-14B-480P-Diffusers:
    the transformer takes the first frame's latents and mask as 20 more input channels and attends to
    the CLIP vision encoder's penultimate hidden states through its own key/value projections)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    tokenizer = T5Tokenizer(vocab=_t5_vocab(), extra_ids=0)
    tokenizer.model_max_length = WAN_MAX_SEQUENCE_LENGTH
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )  # fmt: skip
    )
    heads, head_dim = 2, 12
    # image-to-video: 16 noise + 4 mask (the VAE's temporal factor) + 16 first-frame latent channels in
    i2v: dict = dict(in_channels=36, image_dim=WAN_I2V_IMAGE_DIM, added_kv_proj_dim=heads * head_dim)
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        **(i2v if image_to_video else {"in_channels": 16}),
    )  # fmt: skip
    with torch.no_grad():  # as for FLUX: no zero-initialised projections
        for p in transformer.parameters():  # type: ignore[attr-defined]
            if torch.count_nonzero(p) == 0 and p.dim() >= 1:
                p.normal_(0.0, 0.02)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    parts = dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    if not image_to_video:
        return WanPipeline(**parts)
    # the PIL backend: what transformers picks for CLIPImageProcessor without torchvision (not in the pins)
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=WAN_I2V_IMAGE_DIM,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=WAN_I2V_CLIP_SIZE,
            patch_size=8,
        )
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": WAN_I2V_CLIP_SIZE},
        crop_size={"height": WAN_I2V_CLIP_SIZE, "width": WAN_I2V_CLIP_SIZE},
    )
    return WanImageToVideoPipeline(**parts, image_encoder=image_encoder, image_processor=image_processor)


def build_tiny_pipeline(variant: str = "tiny", seed: int = 0):
    """Build the random-weight pipeline of `variant` in memory (float32): FluxPipeline, WanPipeline or
    WanImageToVideoPipeline."""
    if variant in WAN_VARIANTS:
        return build_tiny_wan_pipeline(seed, image_to_video=variant == WAN_I2V_VARIANT)
    if variant not in SPECS:
        raise ValueError(f"unknown tiny-model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    spec = SPECS[variant]
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec.latent_channels * 4,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.text_dim,
        pooled_projection_dim=spec.clip_dim,
        guidance_embeds=True,
        axes_dims_rope=spec.axes_dims_rope,
    )
    # diffusers zero-initialises the output projections (adaLN-zero); random weights everywhere
    # make the image depend on the prompt and the seed like a trained model's would.
    with torch.no_grad():
        for p in transformer.parameters():  # type: ignore[attr-defined]
            if torch.count_nonzero(p) == 0 and p.dim() >= 1:
                p.normal_(0.0, 0.02)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    clip_vocab, clip_merges = _clip_vocab()
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=clip_merges)  # type: ignore[arg-type]
    tokenizer.model_max_length = 77
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_vocab),
            hidden_size=spec.clip_dim,
            intermediate_size=spec.clip_dim * 2,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=spec.clip_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = T5Tokenizer(vocab=_t5_vocab(), extra_ids=0)
    tokenizer_2.model_max_length = spec.max_sequence_length
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=spec.text_dim,
            d_kv=8,
            d_ff=spec.text_dim * 2,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,  # type: ignore[call-arg]
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def write_tiny_model(folder: str | Path, variant: str = "tiny", seed: int = 0) -> Path:
    """Generate the tiny pipeline and save it (safetensors) into `folder`; returns the folder."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(variant, seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "TINY_MODEL.json").write_text(
        json.dumps(
            {
                "variant": variant,
                "seed": seed,
                "max_sequence_length": (
                    WAN_MAX_SEQUENCE_LENGTH if variant in WAN_VARIANTS else SPECS[variant].max_sequence_length
                ),
            }
        )
    )
    return folder


# the file diffusers' `load_lora_weights` looks for in a folder (LORA_WEIGHT_NAME_SAFE)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_tiny_lora(
    model_folder: str | Path, folder: str | Path, seed: int, rank: int = 4, std: float = 0.2
) -> Path:
    """A LoRA for the tiny model saved in `model_folder`: peft adapters with non-zero random weights
    (seeded) on the transformer's attention projections, written by diffusers' `save_lora_weights`
    (diffusers-format safetensors) as `folder/pytorch_lora_weights.safetensors`; returns that file."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(str(model_folder), subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
    )
    return folder / LORA_WEIGHT_NAME
