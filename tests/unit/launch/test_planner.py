from pathlib import Path

import pytest

from megatron_mgrpo.launch import LaunchError
from megatron_mgrpo.launch.model_shape import ModelConfigError, load_model_shape
from megatron_mgrpo.launch.planner import check_layout, plan_launch
from tests.unit.launch.conftest import RECIPES, model_config_path


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_shipped_recipe_fits_its_documented_cluster(load_recipe, name):
    cfg, shape = load_recipe(name)
    plan = plan_launch(cfg, shape)
    assert plan.problems() == []
    assert plan.train_memory.total_gib < cfg.launch.gpu_memory_gib
    assert plan.layout.train_nodes + plan.layout.rollout_nodes == cfg.launch.nodes


def test_published_parameter_counts():
    counts = {name: load_model_shape("hub/name", model_config_path(recipe))[0].total_params() / 1e9
              for recipe, name in RECIPES.items()}
    assert counts["Qwen3-4B-Base.json"] == pytest.approx(4.02, abs=0.01)
    assert counts["Qwen3-8B-Base.json"] == pytest.approx(8.19, abs=0.01)
    assert counts["Qwen3-30B-A3B-Base.json"] == pytest.approx(30.53, abs=0.01)


def test_large_recipes_train_in_fp8_with_truncated_is_and_moe_routing_replay(load_recipe):
    for name in ("mgrpo_qwen3_8b_math.yaml", "mgrpo_qwen3_30b_a3b_math.yaml"):
        cfg, shape = load_recipe(name)
        assert cfg.model.fp8 != "off" and cfg.algo.tis_mode == "truncate" and cfg.algo.tis_cap > 1
        assert cfg.train.routing_replay == shape.is_moe and cfg.rollout.engine == "sglang"


def test_paper_recipe_layout(load_recipe):
    cfg, shape = load_recipe("mgrpo_qwen3_4b_math.yaml")
    layout = check_layout(cfg, shape)
    # 8 prompts x M=24 policy samples, over dp = 8 GPUs / tp 2
    assert (layout.dp, layout.sequences_per_update, layout.seq_len) == (4, 192, 4096)
    assert cfg.samples_per_prompt() == (24, 8)


BAD_LAYOUTS = [
    ("mgrpo_qwen3_4b_math.yaml", ["parallel.tp=3"], "parallel.tp=3 must divide the 32 attention heads"),
    ("mgrpo_qwen3_4b_math.yaml", ["parallel.tp=16", "launch.gpus_per_node=16"], "must divide the 8 KV heads"),
    ("mgrpo_qwen3_4b_math.yaml", ["parallel.pp=5"], "parallel.pp=5 must divide the 36 layers"),
    ("mgrpo_qwen3_8b_math.yaml", ["parallel.ep=2"], "needs a mixture-of-experts model"),
    ("mgrpo_qwen3_30b_a3b_math.yaml", ["parallel.ep=3"], "parallel.ep=3 must divide the 128 experts"),
    ("mgrpo_qwen3_8b_math.yaml", ["train.routing_replay=true"], "train.routing_replay=true needs a mixture-of"),
    ("mgrpo_qwen3_4b_math.yaml", ["parallel.tp=4", "launch.gpus_per_node=6", "launch.policy_engines=4"],
     "world size 6 is not divisible by parallel.tp=4"),
    ("mgrpo_qwen3_4b_math.yaml", ["launch.policy_engines=4", "launch.momentum_engines=4"],
     "does not match the M:N = 24:8 split"),
    ("mgrpo_qwen3_4b_math.yaml", ["launch.policy_engines=5"], "make the engines tile them exactly"),
    ("mgrpo_qwen3_4b_math.yaml", ["train.micro_batch_tokens=2048"], "does not fit train.micro_batch_tokens=2048"),
    ("mgrpo_qwen3_4b_math.yaml", ["rollout.max_new_tokens=32000"], "exceeds the model's max_position_embeddings"),
    ("mgrpo_qwen3_4b_math.yaml", ["train.prompts_per_step=1", "rollout.group_size=4", "rollout.momentum_samples=1"],
     "do not split evenly over data-parallel size 4"),
    ("mgrpo_qwen3_4b_math.yaml", ["launch.rollout_nodes=1"], "with launch.placement=colocated"),
    ("mgrpo_qwen3_8b_math.yaml", ["launch.rollout_nodes=4"], "at least one rollout node and one training node"),
    ("mgrpo_qwen3_8b_math.yaml", ["rollout.engine=hf"], "needs server engines"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_LAYOUTS)
def test_bad_layouts_name_the_constraint(load_recipe, name, overrides, message):
    cfg, shape = load_recipe(name, *overrides)
    with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(cfg, shape)


def test_memory_overflow_names_the_first_item_and_the_fix(load_recipe):
    # 8B on one colocated node without tensor parallelism: the fp32 EMA is the first item past 80 GiB.
    cfg, shape = load_recipe("mgrpo_qwen3_8b_math.yaml", "launch.nodes=1", "launch.placement=colocated",
                             "launch.rollout_nodes=0", "parallel.tp=1", "launch.policy_engines=6",
                             "launch.momentum_engines=2", "launch.rollout_mem_fraction=0.3")
    plan = plan_launch(cfg, shape)
    overflow = plan.train_memory.first_overflow()
    assert overflow.name == "momentum EMA (fp32)"
    [problem] = plan.problems()
    assert "does not fit" in problem and "raise parallel.tp or parallel.pp" in problem


def test_tensor_parallelism_halves_weights_and_ema_but_not_the_optimizer(load_recipe):
    # Doubling tp halves each rank's shard, but also halves dp, over which the optimizer is sharded.
    tp4, tp2 = ({i.name: i.gib for i in plan_launch(*load_recipe("mgrpo_qwen3_4b_math.yaml", tp)).train_memory.items}
                for tp in ("parallel.tp=4", "parallel.tp=2"))
    for name in ("weights (bf16)", "gradients (fp32)", "momentum EMA (fp32)"):
        assert tp4[name] == pytest.approx(tp2[name] / 2, rel=0.05)
    optimizer = "optimizer (fp32 master + Adam moments, sharded over data parallel)"
    assert tp4[optimizer] == pytest.approx(tp2[optimizer], rel=0.05)


def test_hub_name_without_local_copy_is_sized_by_the_shipped_config_of_that_name():
    shape, source = load_model_shape("Qwen/Qwen3-8B-Base")
    assert shape.total_params() / 1e9 == pytest.approx(8.19, abs=0.01)
    assert source.startswith("no local copy: sized with the shipped ") and "Qwen3-8B-Base.json" in source


def test_unknown_hub_name_names_the_flag_and_the_shipped_configs():
    with pytest.raises(ModelConfigError, match="pass --model-config FILE") as err:
        load_model_shape("acme/Unknown-7B")
    assert "no shipped config is named Unknown-7B.json" in str(err.value)
    assert all(shipped in str(err.value) for shipped in RECIPES.values())


def test_local_checkpoint_and_model_config_win_over_the_shipped_config(tmp_path):
    (tmp_path / "config.json").write_text(Path(model_config_path("mgrpo_qwen3_4b_math.yaml")).read_text())
    assert load_model_shape(str(tmp_path))[1] == str(tmp_path / "config.json")
    explicit = model_config_path("mgrpo_qwen3_4b_math.yaml")
    assert load_model_shape("Qwen/Qwen3-8B-Base", explicit)[1] == explicit


def test_asynchronous_rollout_is_sized_and_flagged_where_it_cannot_overlap(load_recipe):
    """Async rollout: the in-flight batches' host memory is counted; colocated engines are told
    that generation and training take turns; synchronous runs get neither line."""
    cfg, shape = load_recipe("mgrpo_qwen3_4b_math.yaml")
    assert not [w for w in plan_launch(cfg, shape).warnings if "ahead" in w]
    async_cfg, _ = load_recipe("mgrpo_qwen3_4b_math.yaml", "rollout.max_staleness=1",
                               "rollout.momentum_max_staleness=2")
    warnings = plan_launch(async_cfg, shape).warnings
    # 3 batches of 8 prompts x 32 samples x 4096 tokens x 12 bytes
    assert any("3 batches in flight hold 36 MiB" in w for w in warnings), warnings
    assert any("take turns" in w for w in warnings) == (async_cfg.launch.placement == "colocated")
