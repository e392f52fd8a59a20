"""The VRAM budget planner: sizes in, a plan out. Pure: the XL sizes come from the networks built on the meta
device (no weights, no memory), and every plan is checked against the budget it was made for."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from pixart_lowvram.errors import UsageError
from pixart_lowvram.models import sizes_from_shapes
from pixart_lowvram.placement import MIN_STRIP_ROOM, GiB, MiB, PlanError, Sizes, format_plan, make_plan, parse_size
from pixart_lowvram.random_model import count_parameters, empty_models, preset_config

SEED_QUEUE = [(1024, 1024)] * 5  # the seed queue: five 1024x1024 images
SEED_TEXTS = 4  # its distinct prompts and negative prompts
T5_XXL_PARAMS = 4_762_310_656  # T5-v1.1-XXL encoder, the tied token embedding counted once
T5_WO = 4096 * 10240  # one block's `wo` weight, kept in fp32 by transformers


def gib(x: float) -> int:
    return int(x * GiB)


def estimates(plan) -> dict[str, int]:
    return {name: st.estimate for name, st in plan.stages.items()}


# -- parse_size ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("1.5GiB", int(1.5 * 2**30)),
    ("6GB", 6 * 10**9),
    ("800MiB", 800 * MiB),
    ("2g", 2 * 10**9),
    (" 1.5 GiB ", int(1.5 * 2**30)),  # spaces and case do not matter
    ("512mib", 512 * MiB),
    ("auto", "auto"),
    ("AUTO", "auto"),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "0GiB", "1.5XB", "GiB", "1.5.2GB", "0.1b"])
def test_parse_size_refuses_what_is_not_a_positive_size(text):
    with pytest.raises(UsageError, match="--vram-budget"):
        parse_size(text)


# -- sizes of PixArt-XL-2, from shapes alone -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl_models():
    return empty_models(preset_config("xl"))


@pytest.fixture(scope="module")
def xl_sizes(xl_models) -> Sizes:
    shapes = {name: {k: ("F16", list(p.shape)) for k, p in model.state_dict().items()}
              for name, model in xl_models.items()}
    configs = {"text_encoder": xl_models["text_encoder"].config.to_dict(),
               "transformer": dict(xl_models["transformer"].config), "vae": dict(xl_models["vae"].config)}
    return sizes_from_shapes(shapes, configs, torch.float16)


def test_xl_sizes_from_shapes(xl_models, xl_sizes):
    t5 = xl_models["text_encoder"]
    assert count_parameters(t5) == T5_XXL_PARAMS
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(t5.state_dict()), "both tied names are listed"

    # fp16, except the 24 `wo` weights at 4 bytes; the tied embedding once
    assert xl_sizes.text_encoder == T5_XXL_PARAMS * 2 + 24 * T5_WO * 2
    assert xl_sizes.text_encoder / GiB == pytest.approx(10.75, rel=0.02)
    # the largest block is block 0, which also holds the relative-position table
    assert xl_sizes.text_encoder_block == count_parameters(t5.encoder.block[0]) * 2 + T5_WO * 2
    assert xl_sizes.text_encoder_block > count_parameters(t5.encoder.block[1]) * 2 + T5_WO * 2
    assert xl_sizes.text_encoder_block / GiB == pytest.approx(0.44, rel=0.02)
    # outside the blocks and the embedding (which stays on the CPU when streaming): the final layer norm
    assert xl_sizes.text_encoder_other == 4096 * 2

    dit = xl_models["transformer"]
    assert xl_sizes.transformer == count_parameters(dit) * 2
    assert xl_sizes.transformer / GiB == pytest.approx(1.14, rel=0.02)
    assert xl_sizes.transformer_block == count_parameters(dit.transformer_blocks[0]) * 2
    assert xl_sizes.transformer_other == xl_sizes.transformer - 28 * xl_sizes.transformer_block
    assert xl_sizes.vae == count_parameters(xl_models["vae"]) * 2
    assert xl_sizes.vae / GiB == pytest.approx(0.156, rel=0.03)

    assert (xl_sizes.text_dim, xl_sizes.text_ff, xl_sizes.dit_width, xl_sizes.dit_patch, xl_sizes.vae_scale,
            xl_sizes.dtype_bytes) == (4096, 10240, 1152, 2, 8, 2)


def test_sizes_at_float32_count_every_tensor_at_4_bytes(xl_models, xl_sizes):
    shapes = {name: {k: ("F16", list(p.shape)) for k, p in model.state_dict().items()}
              for name, model in xl_models.items()}
    configs = {"text_encoder": xl_models["text_encoder"].config.to_dict(),
               "transformer": dict(xl_models["transformer"].config), "vae": dict(xl_models["vae"].config)}
    fp32 = sizes_from_shapes(shapes, configs, torch.float32)
    assert fp32.text_encoder == T5_XXL_PARAMS * 4
    assert fp32.transformer == 2 * xl_sizes.transformer and fp32.dtype_bytes == 4


# -- plans for the seed queue --------------------------------------------------------------------------------------

def seed_plan(sizes, budget, **kwargs):
    return make_plan(budget, sizes, SEED_QUEUE, texts=SEED_TEXTS, **kwargs)


def test_unconstrained_keeps_everything_resident(xl_sizes):
    plan = seed_plan(xl_sizes, None)
    assert plan.budget is None
    assert [(st.stage, st.placement) for st in plan.stages.values()] == [
        ("encode", "resident"), ("denoise", "resident"), ("decode", "whole")]
    # the estimates still say what it will take: all of T5 plus the CUDA context
    assert plan["encode"].estimate > xl_sizes.text_encoder + plan.context


def test_plan_at_1_5_gib_streams_both_networks_and_decodes_in_strips(xl_sizes):
    budget = gib(1.5)
    plan = seed_plan(xl_sizes, budget)
    assert plan["encode"].placement == "streamed"
    assert plan["denoise"].placement == "streamed"
    assert plan["decode"].placement == "strips"
    # the strips' activations get what the budget leaves beside the context and the VAE's weights
    room = plan["decode"].room
    assert MIN_STRIP_ROOM <= room and plan.context + xl_sizes.vae + room <= budget
    assert all(0 < e <= budget for e in estimates(plan).values()), estimates(plan)
    # two T5 blocks at once do not fit: nothing is prefetched
    assert plan["encode"].ahead == 0


def test_plan_at_8_gib_streams_only_t5(xl_sizes):
    plan = seed_plan(xl_sizes, gib(8))
    assert xl_sizes.text_encoder > gib(8)
    assert (plan["encode"].placement, plan["encode"].ahead) == ("streamed", 1)  # room to prefetch a block
    assert plan["denoise"].placement == "resident"
    assert plan["decode"].placement == "whole"
    assert all(e <= gib(8) for e in estimates(plan).values())


def test_plan_at_16_gib_keeps_t5_resident(xl_sizes):
    plan = seed_plan(xl_sizes, gib(16))
    assert [st.placement for st in plan.stages.values()] == ["resident", "resident", "whole"]
    assert plan["encode"].estimate <= gib(16)


def test_a_budget_too_small_for_the_streamed_dit_names_the_minimum(xl_sizes):
    with pytest.raises(PlanError, match="--vram-budget|too small") as caught:
        seed_plan(xl_sizes, gib(0.7))
    message = str(caught.value)
    assert "denoise" in message and "1024x1024" in message and "0.70 GiB" in message
    minimum = float(re.search(r"at least (\d+\.\d+) GiB", message).group(1))
    assert minimum > 0.7
    # the named minimum is the real threshold: just above it the queue plans, just below it does not
    plan = seed_plan(xl_sizes, gib(minimum + 0.01))
    assert plan["denoise"].placement == "streamed"
    with pytest.raises(PlanError):
        seed_plan(xl_sizes, gib(minimum - 0.01))


def test_encode_on_cpu_is_honoured_at_any_budget(xl_sizes):
    for budget in (None, gib(1.5), gib(40)):
        plan = seed_plan(xl_sizes, budget, encode_on_cpu=True)
        assert plan["encode"].placement == "cpu" and plan["encode"].estimate == 0
        assert plan["denoise"] == seed_plan(xl_sizes, budget)["denoise"], "the other stages are unchanged"


def test_t5_falls_back_to_the_cpu_when_one_block_does_not_fit(xl_sizes):
    # one T5 block (0.44 GiB) plus the CUDA context and reserve is about 1.35 GiB; the streamed DiT needs less
    plan = seed_plan(xl_sizes, gib(1.3))
    assert plan["encode"].placement == "cpu" and "CPU" in plan["encode"].note
    assert plan["denoise"].placement == "streamed"


def test_estimates_grow_with_the_image_size(xl_sizes):
    small = make_plan(None, xl_sizes, [(1024, 1024)], texts=SEED_TEXTS)
    large = make_plan(None, xl_sizes, [(2048, 2048)], texts=SEED_TEXTS)
    assert large["denoise"].estimate > small["denoise"].estimate
    assert large["decode"].estimate > small["decode"].estimate
    # at 4 GiB a 1024x1024 image decodes whole, a 2048x2048 one in strips; both within the budget
    budget = gib(4)
    small, large = (make_plan(budget, xl_sizes, [size], texts=SEED_TEXTS) for size in ((1024, 1024), (2048, 2048)))
    assert small["decode"].placement == "whole"
    assert large["decode"].placement == "strips" and large["decode"].estimate <= budget
    # the largest image of the queue decides
    mixed = make_plan(budget, xl_sizes, [(1024, 1024), (2048, 2048), (512, 512)], texts=SEED_TEXTS)
    assert mixed["decode"] == large["decode"]


def test_a_denoise_batch_that_does_not_fit_falls_back_to_one(xl_sizes):
    roomy = seed_plan(xl_sizes, gib(16), denoise_batch=4)
    assert (roomy["denoise"].placement, roomy["denoise"].batch) == ("resident", 4)
    tight = seed_plan(xl_sizes, gib(1.5), denoise_batch=4)
    assert tight["denoise"].batch == 1 and tight["denoise"].placement == "streamed"
    assert tight["denoise"].estimate <= gib(1.5)
    # the same plan as for batch 1, and the note says why the batch is 1
    assert dataclasses.replace(tight["denoise"], note="") == seed_plan(xl_sizes, gib(1.5))["denoise"]
    assert "--denoise-batch 4" in tight["denoise"].note


def test_format_plan_names_each_stage_and_the_budget(xl_sizes):
    text = format_plan(seed_plan(xl_sizes, gib(1.5)))
    assert "1.50 GiB" in text
    for stage in ("encode", "denoise", "decode"):
        assert re.search(rf"^\s+{stage}\s", text, re.M), text
    assert "streamed" in text and "strips" in text and "of activations" in text
    assert "unconstrained" in format_plan(seed_plan(xl_sizes, None))
    assert "on the CPU" in format_plan(seed_plan(xl_sizes, gib(1.5), encode_on_cpu=True))


def test_a_small_image_whose_whole_decode_does_not_fit_raises_plan_error(xl_sizes):
    # a 256x256 image: the streamed DiT fits in 1 GiB (0.93 GiB), the whole VAE decode does not, and beside
    # the context, the reserve and the VAE's weights less than the least a strip decode needs is left
    with pytest.raises(PlanError, match="decode.*strips"):
        make_plan(gib(1.0), xl_sizes, [(256, 256)])


# -- every plan fits its budget ------------------------------------------------------------------------------------

NEEDS = re.compile(r"needs(?: at least)? (\d+\.\d+) GiB")


def test_every_plan_fits_its_budget(xl_sizes):
    budgets = [1.2 + 0.25 * i for i in range(int((20 - 1.2) / 0.25) + 1)]
    assert budgets[0] == 1.2 and budgets[-1] == pytest.approx(19.95)
    configs = [(size, texts, micro, batch)
               for size in ((1024, 1024), (2048, 2048), (512, 2048), (2048, 512), (256, 256), (768, 1344))
               for texts in (1, SEED_TEXTS, 32) for micro in (1, 4) for batch in (1, 4)]
    planned = refused = 0
    for config in configs:
        size, texts, micro, batch = config
        fitted_at = None
        for budget in map(gib, budgets):
            try:
                plan = make_plan(budget, xl_sizes, [size], texts=texts, encode_batch=micro, denoise_batch=batch)
            except PlanError as exc:
                refused += 1
                assert fitted_at is None, f"{config}: planned at {fitted_at} bytes but not at {budget}"
                need = float(NEEDS.search(str(exc)).group(1))
                assert gib(need + 0.005) > budget, f"{config}: refused at {budget} bytes, needs {need} GiB: {exc}"
                continue
            planned += 1
            fitted_at = fitted_at or budget
            assert plan.budget == budget
            for st in plan.stages.values():
                assert st.estimate <= budget, (config, budget, st)
                assert (st.placement == "cpu") == (st.estimate == 0), st
            assert plan["denoise"].batch in (1, batch)
    assert planned > 0 and refused > 0  # both outcomes occur over this range
