"""Stage 1, encode: tokenizer + T5 -> one embedding and mask per distinct text.

The queue's texts (prompts and negative prompts, each once) go through the text encoder together, through the
reference pipeline's own `encode_prompt` (same tokenization, caption cleaning and padding as a plain call).
Inside each T5 block they run in micro-batches of `batch_size` (1: the reference's exact kernels), so a
block's weights serve the whole group while the results stay those of a one-prompt call. Where the plan says
so, the blocks stream from the weights files (`streaming.py`), or T5 runs on the CPU. The texts go through T5
in groups of the plan's size (`plan.group`: the hidden states of a group are all alive at once, so the planner
picks the largest group that fits the budget)."""
from __future__ import annotations

import contextlib
import logging

import torch

from .models import (ModelInfo, caption_cleaning, load_text_encoder, load_text_encoder_streamed, load_tokenizer,
                     make_pipeline)
from .placement import StagePlan
from .stage import StageContext
from .streaming import micro_batch_blocks


def _load(info: ModelInfo, plan: StagePlan, dtype: torch.dtype, device: torch.device, micro: int,
          eight_bit: bool):
    if plan.placement == "streamed" and not eight_bit:  # the planner keeps an 8-bit T5 resident
        return load_text_encoder_streamed(info.path / "text_encoder", dtype, device, micro_batch=micro,
                                          ahead=plan.ahead)
    model = load_text_encoder(info, dtype, device, eight_bit=eight_bit)
    micro_batch_blocks(model.encoder.block, micro)
    return model, None


class _LimitWarnings(logging.Filter):
    """Holds back the libraries' warnings about texts past T5's token limit: for a group of texts the reference
    pipeline logs the cut tail of every text in it, padding included (megabytes of '<pad>' for a long queue with
    one long prompt), and the tokenizer speaks of a limit of 512 that the pipeline never reaches. The stage says
    instead, once, which texts reach the limit."""

    HELD = ("was truncated because T5 can only handle", "Token indices sequence length is longer")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.HELD)


@contextlib.contextmanager
def _limit_warnings_held(pipe):
    loggers = [logging.getLogger(type(pipe).__module__), logging.getLogger("transformers.tokenization_utils_base")]
    held = _LimitWarnings()
    for logger in loggers:
        logger.addFilter(held)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(held)


def _shown(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width - 1] + "…")


def encode_texts(ctx: StageContext, texts: dict[str, str], *, batch_size: int, cache=None,
                 eight_bit: bool = False) -> int:
    """Encode `texts` (key -> text), writing embeds/<key>.safetensors for each (and to the shared `cache`
    folder, if given). Returns how many were made. The text encoder lives only inside this function.
    `eight_bit`: T5 in 8 bits (bitsandbytes, resident on the GPU: the planner never streams it)."""
    info, folder, plan, reporter = ctx.info, ctx.folder, ctx.plan, ctx.reporter
    device = ctx.device
    keys = list(texts)
    if plan.placement == "cpu":
        # fp16 matrix products are slow or missing on CPUs: compute in fp32, store at the run's dtype
        device, compute_dtype = torch.device("cpu"), torch.float32
    else:
        compute_dtype = ctx.compute_dtype
    # Stored in the dtype T5 computes in on the device: the run's, or an upcast T5's float32, which its values may
    # need (on the CPU it computes in float32, but what it makes is stored as a device run would store it)
    store = ctx.compute_dtype
    streamer = None
    try:
        with reporter.bar("load text encoder", total=2, unit="part", transient=True) as bar:
            tokenizer = load_tokenizer(info)
            bar.update()
            text_encoder, streamer = _load(info, plan, compute_dtype, device, batch_size, eight_bit)
            bar.update()
        pipe = make_pipeline(info, tokenizer=tokenizer, text_encoder=text_encoder)
        ctx.loaded(text_encoder)
        size = plan.group or len(keys)
        tokens = info.geometry.max_sequence_length
        full = []  # texts that fill every token T5 reads: what follows them, if anything, is left out
        with (reporter.bar("encode", total=len(keys), unit="text") as bar, torch.inference_mode(),
              _limit_warnings_held(pipe)):
            for start in range(0, len(keys), size):
                ctx.checkpoint()
                group = keys[start:start + size]
                embeds, mask, _, _ = pipe.encode_prompt(
                    [texts[k] for k in group], do_classifier_free_guidance=False, device=device,
                    clean_caption=caption_cleaning(), max_sequence_length=tokens)
                full += [texts[k] for k, used in zip(group, mask.sum(dim=1).tolist()) if used >= tokens]
                for i, key in enumerate(group):
                    tensors = {"embeds": embeds[i].to(store), "mask": mask[i]}
                    if not ctx.finite(tensors["embeds"], key):
                        continue
                    folder.write_tensors(folder.embed_path(key), tensors, key, text=texts[key])
                    ctx.made += 1
                    if cache is not None:
                        cache.store(key, folder.embed_path(key))
                bar.update(len(group))
        if full:
            more = f" and {len(full) - 3} more" if len(full) > 3 else ""
            reporter.info(f"{len(full)} text(s) reach the {tokens} tokens T5 reads; anything after them is left out, "
                          f"as the reference pipeline leaves it: {', '.join(map(_shown, full[:3]))}{more}")
    finally:
        if streamer is not None:
            streamer.close()
    return ctx.made
