"""Shared parts of the example files' ``pipeline()``: offline tokenizers, stand-in text encoders, tiny VAEs.

Nothing here touches the network: the tokenizers are built with the ``tokenizers`` library over a fixed
vocabulary (``WORDS``: ~300 common English words, punctuation and the family's special tokens; a lowercase
normalizer and a whitespace/punctuation pre-tokenizer; an unknown word becomes the UNK token), the text
encoders and VAEs from ``transformers`` / ``diffusers`` configs with seeded random weights (``seeded``: torch
seed inside a forked RNG, so the caller's RNG is untouched). Every module is fp32 and in ``.eval()``.

- ``tokenizer(kind, max_length)``: ``"gemma"`` (``<bos> words``, pad 0 / eos 1 / bos 2 / unk 3, as Gemma),
  ``"t5"`` (``words </s>``, pad 0 / eos 1 / unk 2, as T5) or ``"clip"`` (``<|startoftext|> words
  <|endoftext|>``, bos 0 / eos = pad 1 / unk 2: CLIP's pooled output is read at the first EOS position, so the
  CLIP configs below carry ``eos_token_id=1``).
- ``gemma2`` / ``t5`` / ``clip``: stand-in encoders whose output width is what the transformer consumes;
  everything else (layers, heads, MLP width) is small.
- ``dc_ae`` (Sana's ``AutoencoderDC``, 32x downsampling) and ``kl_vae`` (``AutoencoderKL``, 8x downsampling).
- ``load_pipeline``: ``checkpoint=DIR`` (a local diffusers pipeline directory) with ``from_pretrained``.
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

WORDS = """
a an the and or but of in on at with without by for from to into under over above below near behind beside
between inside outside through across against along around up down out off is are was were be been being has
have had do does did will would can could should may might must this that these those it its they them their
there here he she his her we our you your i me my one two three four five six seven eight nine ten many few
some all each every no not very more most less much little big small large tiny huge tall short long wide
narrow old young new ancient modern bright dark light heavy soft hard warm cold hot cool wet dry quiet loud calm
wild happy sad beautiful ugly strange simple colorful golden silver wooden metal glass stone paper red orange
yellow green blue purple pink brown black white gray grey cat dog bird horse cow fish fox wolf bear lion tiger
rabbit mouse owl eagle dragon robot man woman child boy girl person people family friend king queen knight
wizard sailor chef farmer artist house home castle tower bridge road street city town village farm garden park
forest tree trees flower flowers grass leaf leaves mountain mountains hill river lake sea ocean beach island
desert field sky cloud clouds sun moon star stars rain snow storm wind fog fire water ice smoke night day
morning evening sunset sunrise winter summer spring autumn car train boat ship plane bicycle window door wall
roof floor table chair bed lamp book books cup bowl plate bottle clock mirror painting photo picture portrait
landscape scene view close background style art drawing illustration sketch oil watercolor cinematic lighting
detailed realistic photograph render digital neon glowing shadow shadows reflection standing sitting walking
running flying swimming sleeping reading holding wearing looking eating playing dancing hat coat dress shoes
glasses apple bread cake coffee tea food fruit street market shop kitchen room library museum station space
planet galaxy mask crown sword shield map candle lantern
. , ! ? ' " - : ; ( ) /
""".split()

SPECIALS = {
    "gemma": {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
    "t5": {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"},
    "clip": {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "unk": "<unk>"},
}


@contextlib.contextmanager
def seeded(seed: int):
    """Build modules with torch seed ``seed`` inside a forked RNG (deterministic, the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _eval(m):
    return m.float().eval()


@functools.lru_cache(maxsize=None)
def _backend(kind: str) -> str:
    """The serialized ``tokenizers.Tokenizer`` of a family (built once; a fresh copy is loaded per call)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    specials = list(dict.fromkeys(SPECIALS[kind].values()))
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in dict.fromkeys(WORDS) if w not in specials])}
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIALS[kind]["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()          # words and runs of punctuation
    s = SPECIALS[kind]
    single = {"gemma": f"{s.get('bos')} $A", "t5": f"$A {s['eos']}", "clip": f"{s.get('bos')} $A {s['eos']}"}[kind]
    used = [t for t in (s.get("bos"), s["eos"]) if t and t in single]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(t, vocab[t]) for t in used])
    return tok.to_str()


def tokenizer(kind: str, max_length: int):
    """A ``PreTrainedTokenizerFast`` of family ``kind`` ("gemma" | "t5" | "clip"), ``model_max_length=max_length``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    s = SPECIALS[kind]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend(kind)), model_max_length=max_length, padding_side="right",
        unk_token=s["unk"], eos_token=s["eos"], pad_token=s.get("pad", s["eos"]),
        **({"bos_token": s["bos"]} if "bos" in s else {}))


def vocab_size(kind: str) -> int:
    return len(json.loads(_backend(kind))["model"]["vocab"])


def _ids(kind: str) -> dict:
    vocab = json.loads(_backend(kind))["model"]["vocab"]
    s = SPECIALS[kind]
    return {f"{k}_token_id": vocab[v] for k, v in s.items() if k in ("pad", "eos", "bos")}


def gemma2(hidden: int, *, seed: int):
    """Stand-in Gemma-2 encoder (``Gemma2Model``, SanaPipeline's text encoder): width ``hidden``, 2 layers."""
    from transformers import Gemma2Config, Gemma2Model
    cfg = Gemma2Config(vocab_size=vocab_size("gemma"), hidden_size=hidden, intermediate_size=min(4 * hidden, 128),
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=4096, sliding_window=256, **_ids("gemma"))
    with seeded(seed):
        return _eval(Gemma2Model(cfg))


def t5(d_model: int, *, seed: int):
    """Stand-in T5 encoder (``T5EncoderModel``): ``d_model`` wide, 2 layers, 2 heads x 16, small FFN."""
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=vocab_size("t5"), d_model=d_model, d_kv=16, d_ff=min(2 * d_model, 128), num_layers=2,
                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0, **_ids("t5"))
    with seeded(seed):
        return _eval(T5EncoderModel(cfg))


def clip(hidden: int, max_length: int, *, projection: int | None = None, seed: int):
    """Stand-in CLIP text encoder: ``CLIPTextModelWithProjection`` when ``projection`` is given, else ``CLIPTextModel``.

    ``eos_token_id`` is the tokenizer's EOS, so the pooled output is read at the first EOS (transformers' rule).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=vocab_size("clip"), hidden_size=hidden, intermediate_size=min(4 * hidden, 128),
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                         projection_dim=projection or hidden, **_ids("clip"))
    with seeded(seed):
        return _eval((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg))


def dc_ae(latent_channels: int, *, scaling_factor: float, seed: int):
    """Small ``AutoencoderDC``: 6 ResBlock levels (32x downsampling), widths 8..32, ``latent_channels`` latent."""
    from diffusers import AutoencoderDC
    widths = (8, 8, 16, 16, 32, 32)
    with seeded(seed):
        return _eval(AutoencoderDC(
            in_channels=3, latent_channels=latent_channels, attention_head_dim=8, encoder_block_types="ResBlock",
            decoder_block_types="ResBlock", encoder_block_out_channels=widths, decoder_block_out_channels=widths,
            encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
            decoder_qkv_multiscales=((),) * 6, scaling_factor=scaling_factor))


def kl_vae(latent_channels: int, *, scaling_factor: float, shift_factor: float | None = None,
           quant_conv: bool = True, seed: int):
    """Small ``AutoencoderKL``: 4 levels (8x downsampling), widths 8/16/16/16, ``latent_channels`` latent."""
    from diffusers import AutoencoderKL
    with seeded(seed):
        return _eval(AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            latent_channels=latent_channels, norm_num_groups=8, sample_size=128, scaling_factor=scaling_factor,
            shift_factor=shift_factor, use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
            force_upcast=False))


def finish(pipe, stand_ins: bool = True):
    """Every ``nn.Module`` component in ``.eval()``, the per-step progress bar off; returns ``pipe``.

    ``stand_ins`` (the pipelines built here, not a checkpoint's): the stand-in text encoders take 4–300 tokens, so almost every prompt is truncated by design: the
    pipelines' and tokenizers' truncation warnings (one or more per prompt) are silenced (diffusers'
    and transformers' log level set to error) rather than flooding ``fbqc capture`` / ``eval``."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    if stand_ins:
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    return pipe


def load_pipeline(cls: type, checkpoint, transformer: torch.nn.Module):
    """``cls.from_pretrained(DIR)`` fp32, local files only, with ``transformer`` (the model file's ``model()``)."""
    d = Path(checkpoint).expanduser()
    index = d / "model_index.json"
    if not index.is_file():
        raise ValueError(f"checkpoint {d} is not a diffusers pipeline directory: {index.name} is missing "
                         f"(pipeline() needs the whole {cls.__name__} — text encoders, tokenizers, VAE, scheduler; "
                         "a directory holding only the transformer works with model() alone)")
    name = json.loads(index.read_text()).get("_class_name")
    if name != cls.__name__:
        raise ValueError(f"checkpoint {d} holds a {name}, this file builds a {cls.__name__}")
    pipe = cls.from_pretrained(str(d), transformer=transformer, local_files_only=True, dtype=torch.float32)
    return finish(pipe, stand_ins=False)
