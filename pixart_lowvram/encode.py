"""Stage 1, encode: tokenizer + T5 -> one embedding and mask per distinct text.

Every prompt and negative prompt of the queue goes through the text encoder once, in batches, through the
reference pipeline's own `encode_prompt` (same tokenization, caption cleaning and padding as a plain call)."""
from __future__ import annotations

import torch

from .models import ModelInfo, caption_cleaning, load_text_encoder, load_tokenizer, make_pipeline
from .reporting import Reporter
from .run import RunFolder


def encode_texts(info: ModelInfo, texts: dict[str, str], *, folder: RunFolder, device: torch.device,
                 dtype: torch.dtype, batch_size: int, reporter: Reporter, checkpoint) -> int:
    """Encode `texts` (key -> text), writing embeds/<key>.safetensors for each. Returns how many were made.

    The text encoder lives only inside this function: when it returns, nothing of it is referenced."""
    keys = list(texts)
    with reporter.bar("load text encoder", total=2, unit="part", transient=True) as bar:
        tokenizer = load_tokenizer(info)
        bar.update()
        text_encoder = load_text_encoder(info, dtype, device)
        bar.update()
    pipe = make_pipeline(info, tokenizer=tokenizer, text_encoder=text_encoder)
    with reporter.bar("encode", total=len(keys), unit="text") as bar, torch.inference_mode():
        for start in range(0, len(keys), batch_size):
            checkpoint()
            batch = keys[start:start + batch_size]
            embeds, mask, _, _ = pipe.encode_prompt(
                [texts[k] for k in batch], do_classifier_free_guidance=False, device=device,
                clean_caption=caption_cleaning(), max_sequence_length=info.max_sequence_length)
            for i, key in enumerate(batch):
                folder.write_tensors(folder.embed_path(key), {"embeds": embeds[i], "mask": mask[i]}, key,
                                     text=texts[key])
            bar.update(len(batch))
    return len(keys)
