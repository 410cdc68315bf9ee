"""Tiny random stock diffusers pipelines of the five video families, built in code (no downloads).

``build_pipeline(family)`` returns a seeded, deterministic pipeline: a tiny transformer (the
sizes of ``tiny_models.py``), a tiny VAE, a tiny text encoder built from its config and a
word-level tokenizer built with the ``tokenizers`` library, so that ``prompt=`` works like with
the real pipelines. Families: "wan" (Wan 2.1), "wan22" (Wan 2.2: ``transformer_2`` +
``boundary_ratio``), "hunyuan", "cogvideox", "ltx", "mochi". ``CALL_KWARGS[family]`` are small
call arguments (frames, size); one call with 3 steps takes well under a second on a CPU.
``save_pipeline(family, folder)`` writes one with ``save_pretrained`` (for the CLI tests).
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a an the red green blue yellow white black orange purple circle square triangle ball box cat dog car "
         "tree house moving left right up down growing shrinking rotating bouncing on in over under with and of "
         "dark light striped bright background sky water grass road night day slowly quickly two three small "
         "big video monkey dance dancing").split()
FAMILIES = ("wan", "wan22", "hunyuan", "cogvideox", "ltx", "mochi")
# every family: 3 latent frames (CFG on; Hunyuan's true CFG needs a negative prompt)
CALL_KWARGS = {
    "wan": dict(height=32, width=32, num_frames=9, guidance_scale=5.0),
    "wan22": dict(height=32, width=32, num_frames=9, guidance_scale=5.0),
    "hunyuan": dict(height=32, width=32, num_frames=9, true_cfg_scale=4.0, negative_prompt="dark",
                    prompt_template={"template": "{}", "crop_start": 0}),
    "cogvideox": dict(height=32, width=32, num_frames=9, guidance_scale=6.0),
    "ltx": dict(height=32, width=32, num_frames=9, guidance_scale=3.0),
    "mochi": dict(height=32, width=32, num_frames=13, guidance_scale=4.5),
}
MAX_SEQUENCE_LENGTH = 16   # text tokens: the tiny CogVideoX / Mochi transformers are built for 16


def tiny_tokenizer(bos: bool = False):
    """A lower-casing word-level tokenizer over :data:`WORDS` (unknown words -> <unk>), ending with </s>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "<unk>", "</s>", "<s>"]
    vocab = {w: i for i, w in enumerate(special + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = ("<s> $A </s>" if bos else "$A </s>")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("</s>", vocab["</s>"]), ("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", model_max_length=512)


def _vocab_size() -> int:
    return 4 + len(dict.fromkeys(WORDS))


def _t5(umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    kw = dict(vocab_size=_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
              relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def _seeded(fn, seed: int):
    torch.manual_seed(seed)
    return fn()


def _wan(two: bool):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                     in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=256,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32)
    vae = _seeded(lambda: AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                           temperal_downsample=[False, True, True]), 0)
    kw = dict(transformer=_seeded(transformer, 1), vae=vae, text_encoder=_seeded(lambda: _t5(umt5=True), 2),
              tokenizer=tiny_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    if two:
        kw.update(transformer_2=_seeded(transformer, 3), boundary_ratio=0.5)
    return WanPipeline(**kw)


def _hunyuan():
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel
    transformer = _seeded(lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 12, 12)), 1)
    vae = _seeded(lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4), 0)
    llama = _seeded(lambda: LlamaModel(LlamaConfig(
        vocab_size=_vocab_size(), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=4, num_hidden_layers=2, pad_token_id=0, bos_token_id=3, eos_token_id=2)), 2)
    clip = _seeded(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=_vocab_size(), hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=1, pad_token_id=0, bos_token_id=3, eos_token_id=2, projection_dim=16)), 3)
    return HunyuanVideoPipeline(transformer=transformer, vae=vae, text_encoder=llama, tokenizer=tiny_tokenizer(True),
                                text_encoder_2=clip, tokenizer_2=tiny_tokenizer(True),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler
    transformer = _seeded(lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=MAX_SEQUENCE_LENGTH), 1)
    vae = _seeded(lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4), 0)
    return CogVideoXPipeline(tokenizer=tiny_tokenizer(), text_encoder=_seeded(_t5, 2), vae=vae,
                             transformer=transformer, scheduler=DDIMScheduler())


def _ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    transformer = _seeded(lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, num_layers=1, caption_channels=32), 1)

    def vae():
        v = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                  spatio_temporal_scaling=(True, True, False, False),
                                  layers_per_block=(1, 1, 1, 1, 1), decoder_block_out_channels=(8, 8, 8, 8),
                                  decoder_spatio_temporal_scaling=(True, True, False, False),
                                  decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=1, patch_size_t=1,
                                  encoder_causal=True, decoder_causal=False)
        v.use_framewise_encoding = v.use_framewise_decoding = False
        return v
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_seeded(vae, 0),
                       text_encoder=_seeded(_t5, 2), tokenizer=tiny_tokenizer(), transformer=transformer)


def _mochi():
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    transformer = _seeded(lambda: MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=1, pooled_projection_dim=32,
        in_channels=12, out_channels=None, text_embed_dim=32, time_embed_dim=16, activation_fn="swiglu",
        max_sequence_length=MAX_SEQUENCE_LENGTH), 1)
    vae = _seeded(lambda: AutoencoderKLMochi(latent_channels=12, out_channels=3,
                                              encoder_block_out_channels=(32, 32, 32, 32),
                                              decoder_block_out_channels=(32, 32, 32, 32),
                                              layers_per_block=(1, 1, 1, 1, 1)), 0)
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_seeded(_t5, 2),
                         tokenizer=tiny_tokenizer(), transformer=transformer)


_BUILDERS = {"wan": lambda: _wan(False), "wan22": lambda: _wan(True), "hunyuan": _hunyuan,
             "cogvideox": _cogvideox, "ltx": _ltx, "mochi": _mochi}


def build_pipeline(family: str):
    """A fresh tiny pipeline of ``family`` (same weights on every call), on the CPU, eval mode."""
    pipe = _BUILDERS[family]()
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family: str, steps: int = 3, seed: int = 0, prompt: str = "a red ball moving left") -> dict:
    """Arguments of a small seeded ``pipe(...)`` call for ``family`` (output: torch frames)."""
    return dict(prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt", **CALL_KWARGS[family])


def save_pipeline(family: str, folder) -> Path:
    """``save_pretrained`` a tiny pipeline of ``family`` into ``folder`` (safetensors); returns the folder."""
    folder = Path(folder)
    build_pipeline(family).save_pretrained(str(folder), safe_serialization=True)
    return folder
