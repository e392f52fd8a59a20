"""The budget planner: sizes and budgets in, a plan out. Pure: the XL sizes come from the networks built on the meta
device (no weights, no memory), and every plan is checked against the VRAM and host budgets it was made for; the
encode stage follows the plan's group."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file

from pixart_lowvram.encode import encode_texts
from pixart_lowvram.errors import UsageError
from pixart_lowvram.memory import StageStats, available_ram, current_ram, resolve_host_budget
from pixart_lowvram.models import resolve_model, sizes_from_shapes
from pixart_lowvram.placement import (MIN_STRIP_ROOM, PROCESS_RSS, GiB, MiB, PlanError, Sizes, StagePlan,
                                     format_plan, make_plan, parse_size)
from pixart_lowvram.random_model import count_parameters, empty_models, preset_config
from pixart_lowvram.reporting import Bar, Reporter
from pixart_lowvram.run import RunFolder
from pixart_lowvram.stage import StageContext
from pixart_lowvram.vae_strips import host_bytes as strip_host_bytes

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


def test_a_size_without_a_unit_too_small_to_mean_bytes_gets_a_hint():
    with pytest.raises(UsageError, match=r"--host-budget '2': 2 bytes .*did you mean 2GiB\?"):
        parse_size("2", "--host-budget")
    assert parse_size(str(2 * 2**30)) == 2 * 2**30  # plain bytes stay bytes


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


def test_the_automatic_denoise_batch_follows_the_image_size_and_the_budget(xl_sizes):
    def auto(size, budget=None):
        return make_plan(budget, xl_sizes, [size], texts=2, denoise_batch=None)["denoise"]

    # where batching paid on the H200: 4 at 512x512, 2 at 1024x1024, none from 2048x2048
    assert [auto(size).batch for size in ((512, 512), (1024, 1024), (2048, 512), (2048, 2048))] == [4, 2, 2, 1]
    assert auto((256, 256)).batch == 4  # never more than 4
    # it costs GPU memory, so the estimate grows with it
    assert auto((1024, 1024)).estimate > make_plan(None, xl_sizes, [(1024, 1024)], texts=2)["denoise"].estimate
    # under a budget too small for it, batch 1 -- and no note about an option nobody gave
    tight = auto((1024, 1024), gib(1.5))
    assert tight.batch == 1 and tight.note == "" and tight.estimate <= gib(1.5)


def test_the_automatic_denoise_batch_is_one_on_the_cpu(tiny_model):
    from pixart_lowvram.generate import plan_run
    from pixart_lowvram.items import expand
    from pixart_lowvram.jobs import Job
    from pixart_lowvram.resolve import Settings, resolve

    jobs = [Job(index=1, prompt="a", width=256, height=256, count=4, seed=1)]
    resolved = resolve(jobs, Settings(model=tiny_model, device="cpu", dtype="float32"))
    items, _ = expand(jobs, resolved.info.defaults, {})
    assert plan_run(resolved, items, texts=1)["denoise"].batch == 1
    asked = resolve(jobs, Settings(model=tiny_model, device="cpu", dtype="float32", denoise_batch=4))
    assert plan_run(asked, items, texts=1)["denoise"].batch == 4


def test_a_ranks_plan_has_the_vae_encode_stage_for_the_init_images_it_is_given(tmp_path):
    """A rank of several encodes the init images rank 0 gives it, whichever rank's images need them: its plan has
    the stage for those (sized by the largest, at the size it is encoded at), not for its own images' pictures. On
    a folder diffusers wrote without resolution bins, so that sizes are used as asked."""
    from PIL import Image

    from pixart_lowvram.generate import plan_run
    from pixart_lowvram.items import expand
    from pixart_lowvram.jobs import Job
    from pixart_lowvram.resolve import Settings, resolve
    from pixart_lowvram.vae_encode import InitImage
    from test_foreign_configs import save_folder, small_vae

    folder = save_folder(tmp_path / "model", vae=small_vae(2))
    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(picture)
    jobs = [Job(index=1, prompt="a", width=32, height=32, seed=1),
            Job(index=2, prompt="b", width=32, height=32, seed=2, init_image=str(picture), strength=0.5)]
    resolved = resolve(jobs, Settings(model=folder, device="cpu", dtype="float32"))
    items, _ = expand(jobs, resolved.info.defaults, {})
    text_only, img2img = items
    assert list(plan_run(resolved, [img2img], texts=1).stages) == ["encode", "vae-encode", "denoise", "decode"]
    assert "vae-encode" not in plan_run(resolved, [text_only], texts=1).stages
    assert "vae-encode" not in plan_run(resolved, [img2img], texts=1, inits=[]).stages, "another rank encodes it"
    small, large = InitImage("s.png", 32, 32, "k1"), InitImage("l.png", 128, 96, "k2")
    given = plan_run(resolved, [text_only], texts=1, inits=[small, large])
    assert list(given.stages) == ["encode", "vae-encode", "denoise", "decode"]
    assert given["vae-encode"] == plan_run(resolved, [text_only], texts=1, inits=[large])["vae-encode"]
    assert given["vae-encode"].estimate > plan_run(resolved, [text_only], texts=1, inits=[small])["vae-encode"].estimate
    assert given["denoise"] == plan_run(resolved, [text_only], texts=1)["denoise"], "its images' plan as before"


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


# -- long queues: the group of texts that goes through T5 together is planned ------------------------------------

def test_a_long_queue_encodes_in_groups_that_fit_the_budget(xl_sizes):
    # 33 distinct texts at 1.5 GiB: more hidden states than fit beside one T5 block, so they go in groups
    plan = make_plan(gib(1.5), xl_sizes, [(1024, 1024)], texts=33)
    encode = plan["encode"]
    assert encode.placement == "streamed" and 1 <= encode.group < 33
    assert encode.estimate <= gib(1.5)
    assert f"every {encode.group} text(s)" in encode.note
    # the next larger group would not fit
    bigger = make_plan(gib(1.5) + (encode.estimate - make_plan(gib(1.5), xl_sizes, [(1024, 1024)],
                                                                texts=encode.group - 1)["encode"].estimate) * 2,
                       xl_sizes, [(1024, 1024)], texts=33)
    assert bigger["encode"].group > encode.group
    # a queue of few texts encodes them in one group; unconstrained, every text is one group
    assert make_plan(gib(1.5), xl_sizes, [(1024, 1024)], texts=4)["encode"].group == 4
    assert make_plan(None, xl_sizes, [(1024, 1024)], texts=500)["encode"].group == 500


@pytest.mark.parametrize("texts", [1, 4, 32, 33, 100, 500])
def test_every_queue_length_plans_within_the_budget(xl_sizes, texts):
    for budget in map(gib, (1.5, 2, 3, 4, 6, 8)):
        plan = make_plan(budget, xl_sizes, [(1024, 1024)], texts=texts, encode_batch=8)
        assert all(st.estimate <= budget for st in plan.stages.values()), format_plan(plan)
        assert plan["encode"].group <= texts and plan["encode"].batch <= plan["encode"].group


def test_the_encode_estimate_covers_the_measured_long_queue(xl_sizes):
    """The 32-text group at 1.5 GiB (T5 streamed, no block ahead) peaked at 1.56 GiB NVML on the H200, the 4-text
    seed queue at 1.32 (BENCHMARKS.md): the estimates for those groups are not below them."""
    roomy = gib(1.75)  # streamed with nothing ahead, room for a group of 32
    for texts, measured in ((32, 1.56), (4, 1.32)):
        encode = make_plan(roomy, xl_sizes, [(1024, 1024)], texts=texts)["encode"]
        assert (encode.placement, encode.ahead, encode.group) == ("streamed", 0, texts)
        assert encode.estimate >= gib(measured)


# -- a batch option never changes a placement ----------------------------------------------------------------------

def test_encode_batch_8_at_1_5_gib_streams_t5_at_batch_1_instead_of_moving_it_to_the_cpu(xl_sizes):
    plan = make_plan(gib(1.5), xl_sizes, [(1024, 1024)], texts=33, encode_batch=8)
    assert plan["encode"].placement == "streamed" and plan["encode"].batch == 1
    assert "--encode-batch 8" in plan["encode"].note
    one = make_plan(gib(1.5), xl_sizes, [(1024, 1024)], texts=33)["encode"]
    assert dataclasses.replace(plan["encode"], note="") == dataclasses.replace(one, note="")
    # the seed queue's 4 texts: a micro-batch of all 4 fits beside one streamed block
    seed = seed_plan(xl_sizes, gib(1.5), encode_batch=8)["encode"]
    assert (seed.placement, seed.batch, seed.group) == ("streamed", 4, 4) and seed.estimate <= gib(1.5)


def test_placements_do_not_depend_on_the_batch_options(xl_sizes):
    for budget in [None] + [gib(1.3 + 0.2 * i) for i in range(60)]:
        for size in ((1024, 1024), (2048, 2048), (512, 512)):
            try:
                one = make_plan(budget, xl_sizes, [size], texts=33)
            except PlanError:
                continue
            for encode_batch, denoise_batch in ((8, 1), (1, 8), (32, 4)):
                other = make_plan(budget, xl_sizes, [size], texts=33, encode_batch=encode_batch,
                                  denoise_batch=denoise_batch)
                for stage in ("encode", "denoise", "decode"):
                    assert (other[stage].placement, other[stage].ahead) == (one[stage].placement, one[stage].ahead), \
                        (budget, size, stage)
                assert other["encode"].batch in (1, encode_batch) and other["denoise"].batch in (1, denoise_batch)


# -- host RAM --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sigma_2k_sizes() -> Sizes:
    """PixArt-Σ 2K in a float16 run: 300 text tokens, its SDXL VAE decoding in float32."""
    models = empty_models(preset_config("xl-sigma-2k"))
    shapes = {name: {k: ("F16", list(p.shape)) for k, p in model.state_dict().items()}
              for name, model in models.items()}
    configs = {"text_encoder": models["text_encoder"].config.to_dict(),
               "transformer": dict(models["transformer"].config), "vae": dict(models["vae"].config)}
    return sizes_from_shapes(shapes, configs, torch.float16, 300, vae_dtype=torch.float32)


@pytest.mark.parametrize("host", [8, 16, 32])
@pytest.mark.parametrize("kind, budget, size", [("alpha", 1.5, (1024, 1024)), ("sigma-2k", 2.5, (2048, 2048))])
def test_every_stage_fits_the_host_budget(xl_sizes, sigma_2k_sizes, kind, budget, size, host):
    sizes = xl_sizes if kind == "alpha" else sigma_2k_sizes
    plan = make_plan(gib(budget), sizes, [size], texts=4, host_budget=gib(host))
    assert plan.host_budget == gib(host)
    for st in plan.stages.values():
        assert st.estimate <= gib(budget)
        assert PROCESS_RSS + st.host <= gib(host), format_plan(plan)
    assert plan["denoise"].placement == "streamed" and plan["denoise"].hold_in_ram  # ~1 GiB of DiT blocks
    assert plan["decode"].placement == "strips"


def test_sigma_2k_strips_wait_in_files_where_ram_is_short(sigma_2k_sizes):
    """At 2.5 GiB the strip decoder's float32 activations for a 2048x2048 image take ~14.5 GiB of pinned RAM (a run
    measured 23.6 GiB of RSS): with 32 GiB they stay in RAM; with 16 or 8, the rest waits in files."""
    plans = {host: make_plan(gib(2.5), sigma_2k_sizes, [(2048, 2048)], texts=4, host_budget=gib(host))["decode"]
             for host in (8, 16, 32)}
    assert plans[32].spill == 0 and plans[32].host > gib(8)
    for host in (8, 16):
        assert plans[host].spill > 0 and "files in the run folder" in plans[host].note
        assert plans[host].pinned_limit == gib(host) - PROCESS_RSS
    assert plans[8].host < plans[16].host < plans[32].host
    assert plans[8].room == plans[32].room, "the GPU side is the same"
    # unconstrained RAM keeps everything pinned
    assert make_plan(gib(2.5), sigma_2k_sizes, [(2048, 2048)])["decode"].spill == 0


def test_dit_blocks_are_read_from_the_files_where_ram_cannot_hold_them(xl_sizes):
    # T5-XXL's pinned ring needs more RAM than the DiT's blocks: a T5-base-sized encoder leaves the DiT's RAM apart
    sizes = dataclasses.replace(xl_sizes, text_encoder_block=60 * MiB, text_dim=768, text_ff=2048, text_heads=12)
    held = seed_plan(sizes, gib(1.5), host_budget=gib(8))["denoise"]
    tight = seed_plan(sizes, gib(1.5), host_budget=PROCESS_RSS + gib(0.5))["denoise"]
    assert held.hold_in_ram and held.host >= 20 * xl_sizes.transformer_block
    assert not tight.hold_in_ram and tight.host == (tight.ahead + 2) * xl_sizes.transformer_block
    assert "files" in tight.note
    assert (tight.placement, tight.ahead, tight.estimate) == (held.placement, held.ahead, held.estimate)


def test_a_host_budget_too_small_for_streaming_t5_raises_a_plan_error(xl_sizes):
    with pytest.raises(PlanError, match="--host-budget"):
        seed_plan(xl_sizes, gib(1.5), host_budget=PROCESS_RSS + gib(0.5))


def test_t5_on_the_cpu_must_fit_in_ram(xl_sizes):
    # T5-XXL in float32 is ~18 GiB: asked for on the CPU with 16 GiB of RAM, the plan says it cannot
    with pytest.raises(PlanError, match="host budget"):
        seed_plan(xl_sizes, gib(8), encode_on_cpu=True, host_budget=gib(16))
    plan = seed_plan(xl_sizes, gib(8), encode_on_cpu=True, host_budget=gib(32))
    assert plan["encode"].placement == "cpu" and PROCESS_RSS + plan["encode"].host <= gib(32)


def test_format_plan_shows_gpu_and_host_memory(sigma_2k_sizes):
    text = format_plan(make_plan(gib(2.5), sigma_2k_sizes, [(2048, 2048)], texts=4, host_budget=gib(16)))
    assert "host budget 16.00 GiB" in text and "host RAM" in text and "GPU peak" in text
    assert re.search(r"decode .* \(\+\d+\.\d+ GiB file\)", text), text


def test_the_strip_walk_spills_what_is_past_its_pinned_limit():
    """vae_strips.host_bytes mirrors StripDecoder's choices: Σ-2K's SDXL VAE in float32 at 2048x2048 in 0.93 GiB."""
    channels, room = (128, 256, 512, 512), int(0.93 * GiB)
    pinned, in_files = strip_host_bytes(channels, 2, 2048, 2048, 4, room)
    assert in_files == 0 and pinned > 8 * GiB  # the activations of the full-resolution layers, as pinned blocks
    none_pinned, spilled = strip_host_bytes(channels, 2, 2048, 2048, 4, room, pinned_limit=0)
    assert none_pinned == 0 and 0 < spilled < pinned  # files hold exact sizes, not power-of-two blocks
    half, rest = strip_host_bytes(channels, 2, 2048, 2048, 4, room, pinned_limit=6 * GiB)
    assert 0 < half <= 6 * GiB and 0 < rest <= spilled
    # a room as large as the whole decode needs keeps everything on the GPU
    assert strip_host_bytes(channels, 2, 512, 512, 4, 8 * GiB) == (0, 0)


# -- budgets as a run measures them ---------------------------------------------------------------------------------

def test_host_budget_sizes_and_auto():
    assert resolve_host_budget("16GiB") == 16 * GiB and resolve_host_budget(8 * GiB) == 8 * GiB
    auto = resolve_host_budget("auto")
    free = available_ram()
    if free is not None:  # what the process holds, plus what the machine can give, less the margin
        assert 0 <= auto <= free + current_ram()
    with pytest.raises(UsageError, match="--host-budget 'lots'"):
        resolve_host_budget("lots")


def test_a_stage_over_its_budget_says_so_in_its_record():
    fine = StageStats("encode", nvml_peak=gib(1.32), ram_peak=gib(3), vram_budget=gib(1.5), host_budget=gib(16))
    assert fine.over_budget() == [] and fine.to_json()["over_budget"] == []
    over = StageStats("encode", nvml_peak=gib(1.56), ram_peak=gib(17), vram_budget=gib(1.5), host_budget=gib(16))
    assert over.to_json()["over_budget"] == ["GPU 1.56 GiB (NVML) over the 1.50 GiB budget",
                                             "host RAM 17.00 GiB over the 16.00 GiB budget"]
    assert StageStats("decode", nvml_peak=gib(30)).over_budget() == []  # no budget, nothing to keep


# -- the encode stage follows the plan's group -----------------------------------------------------------------------

def test_encode_runs_the_texts_in_the_plans_groups_with_the_same_embeddings(tiny_model, tmp_path):
    class Groups(Reporter):
        """Records how many texts each step of the encode bar covered: one step a group."""

        def __init__(self):
            self.steps: list[int] = []

        def bar(self, desc, total, unit="it", transient=False):
            steps = self.steps

            class Recording(Bar):
                def update(self, n: int = 1) -> None:
                    if desc == "encode":
                        steps.append(n)

            return Recording()

    info = resolve_model(tiny_model)
    texts = {f"text{i}": f"a lighthouse, number {i}" for i in range(5)}

    def encode(group: int, folder_path):
        reporter = Groups()
        with RunFolder(folder_path) as folder:
            ctx = StageContext(info=info, folder=folder, device=torch.device("cpu"), dtype=torch.float32,
                               plan=StagePlan("encode", "resident", estimate=0, group=group), reporter=reporter)
            encode_texts(ctx, texts, batch_size=1)
            return reporter.steps, {key: load_file(folder.embed_path(key)) for key in texts}

    steps, grouped = encode(2, tmp_path / "groups-of-2")
    assert steps == [2, 2, 1]
    steps, together = encode(5, tmp_path / "one-group")
    assert steps == [5]
    for key in texts:  # micro-batches of one: each text's embedding does not depend on its group
        assert torch.equal(grouped[key]["embeds"], together[key]["embeds"])


# Whole-process NVML peaks measured on the H100 with the seed queue (BENCHMARKS.md, "VRAM budgets", call 11)
MEASURED = {None: {"encode": 11.49, "denoise": 2.13, "decode": 3.63},
            8: {"encode": 1.77, "denoise": 2.20, "decode": 3.94},
            1.5: {"encode": 1.32, "denoise": 1.36, "decode": 1.38}}


@pytest.mark.parametrize("budget", list(MEASURED))
def test_no_estimate_falls_below_what_was_measured(xl_sizes, budget):
    plan = seed_plan(xl_sizes, None if budget is None else gib(budget))
    for stage, measured in MEASURED[budget].items():
        assert plan[stage].estimate >= gib(measured), (stage, format_plan(plan))


# -- image-to-image: the VAE encoder's stage ------------------------------------------------------------------------

def test_init_images_add_a_vae_encode_stage_whole_or_in_strips_within_the_budget(xl_sizes):
    """Image-to-image's init images are encoded before denoise: whole where it fits, in exact strips at 1.5 GiB,
    the estimate within the budget; a queue without init images has no such stage."""
    assert "vae-encode" not in seed_plan(xl_sizes, gib(1.5)).stages
    free = seed_plan(xl_sizes, None, init_sizes=[(1024, 1024)])
    assert list(free.stages) == ["encode", "vae-encode", "denoise", "decode"]
    assert free["vae-encode"].placement == "whole"
    tight = seed_plan(xl_sizes, gib(1.5), init_sizes=[(1024, 1024), (512, 512)])
    stage = tight["vae-encode"]
    assert stage.placement == "strips" and stage.estimate <= gib(1.5) and stage.room >= MIN_STRIP_ROOM
    assert stage.host > 0  # the full-resolution activations wait in pinned RAM between layers
    assert "vae-encode" in format_plan(tight) and "exact" in stage.note
    # where RAM is short, what does not fit waits in files in the run folder, as the strip decoder's does
    short = seed_plan(xl_sizes, gib(1.5), init_sizes=[(1024, 1024)], host_budget=PROCESS_RSS + gib(1.2))
    assert stage.host > gib(1.2)  # the pinned blocks it would hold, as torch's allocator rounds them
    assert short["vae-encode"].spill > 0 and short["vae-encode"].host <= gib(1.2)


def test_the_encoder_strip_walk_counts_its_host_memory():
    """vae_strips.encoder_host_bytes mirrors StripEncoder's choices for SD's VAE at 1024x1024 in float16."""
    from pixart_lowvram.vae_strips import encoder_host_bytes

    channels = (128, 256, 512, 512)
    assert encoder_host_bytes(channels, 2, 1024, 1024, 2, 8 * GiB) == (0, 0)  # the whole encode fits
    pinned, in_files = encoder_host_bytes(channels, 2, 1024, 1024, 2, int(0.37 * GiB))
    assert in_files == 0 and 256 * MiB <= pinned <= 2 * GiB  # 128 x 1024 x 1024 x 2 bytes a full-size activation
    none_pinned, spilled = encoder_host_bytes(channels, 2, 1024, 1024, 2, int(0.37 * GiB), pinned_limit=0)
    assert none_pinned == 0 and 0 < spilled <= pinned
