"""The run config: one frozen object built from the flags, saved whole, read back; ranges checked at parse
time, before megatron-core is imported; imports that run one way."""

import ast
import dataclasses
import json
import subprocess
import sys
import time

import pytest

from launcher import REPO, TINY_MOE
from megatron_moe import run_config
from megatron_moe.arguments.megatron_lm import is_refused
from megatron_moe.arguments import (ARCHITECTURE, ATTENTION_BACKENDS, DERIVED, MODEL, RUN, TOKENIZER, ConfigError,
                                    RunConfig, build_parser, parse_args, validate_args)

REQUIRED = TINY_MOE + ["--train-iters", "3"]
ALL = (ARCHITECTURE, MODEL, TOKENIZER, RUN)
# many flags away from their defaults, including a routing scheme's own and ones validation fills in
VARIED = REQUIRED + ["--moe-router-type", "sam", "--sam-num-groups", "2", "--sam-renormalize-gates",
                     "--moe-layer-freq", "[0,1,1,1]", "--recompute-activations", "--bf16", "--rotary-base", "500",
                     "--position-embedding-type", "rope", "--no-check-for-nan-in-loss-and-grad",
                     "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--save", "ckpt", "--save-interval", "2"]


@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "0"], "--train-iters must be >= 1, got 0"),
    (["--train-iters", "-5"], "--train-iters must be >= 1, got -5"),
    (["--lr=-1e-3"], "--lr must be >= 0, got -0.001"),
    (["--min-lr", "0.1"], "--min-lr 0.1 exceeds --lr 0.001"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
    (["--adam-eps=-1e-8"], "--adam-eps must be >= 0"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0.0, 1.0)"),
    (["--adam-beta2", "-0.5"], "--adam-beta2 must be in [0.0, 1.0)"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0.0, 1.0]"),
    (["--attention-dropout", "-0.1"], "--attention-dropout must be in [0.0, 1.0]"),
    (["--seq-length", "0"], "--seq-length must be >= 1"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size must be >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters must be >= 0"),
    (["--eval-interval", "0"], "--eval-interval must be >= 1"),
    (["--eval-iters", "-1"], "--eval-iters must be >= 0"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--rotary-percent", "0"], "--rotary-percent must be > 0"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "exclude each other"),
])
def test_out_of_range_values_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as error:
        parse_args(REQUIRED + flags)
    assert "\n" not in str(error.value)


def test_eval_iters_zero_means_no_validation():
    assert parse_args(REQUIRED + ["--eval-iters", "0"]).eval_iters == 0


def test_bad_flag_fails_before_megatron_core_is_imported():
    """pretrain_gpt_moe.py's own main: exit 2, one line, and neither megatron-core nor torch imported."""
    probe = ("import sys, time; start = time.perf_counter(); import pretrain_gpt_moe; "
             "sys.argv = ['pretrain_gpt_moe.py', *sys.argv[1:]]; status = pretrain_gpt_moe.main(); "
             "print(status, time.perf_counter() - start, any(m.startswith('megatron.core') for m in sys.modules), "
             "'torch' in sys.modules)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe, *TINY_MOE, "--train-iters", "0"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    status, seconds, megatron_imported, torch_imported = result.stdout.split()
    assert (status, megatron_imported, torch_imported) == ("2", "False", "False"), result.stderr
    assert result.stderr.strip().splitlines() == ["pretrain_gpt_moe.py: error: --train-iters must be >= 1, got 0"]
    print(f"--train-iters 0: error after {float(seconds):.2f} s in main, {wall:.2f} s wall")


def test_validation_leaves_the_parsed_namespace_alone_and_the_config_is_frozen():
    namespace = build_parser().parse_args(VARIED)
    before = dict(vars(namespace))
    config = validate_args(namespace, world_size=2)
    assert vars(namespace) == before
    assert (config.world_size, config.data_parallel_size, config.sam_num_groups) == (2, 2, 2)
    assert config.ffn_hidden_size == 256 and config.moe_layer_pattern == (0, 1, 1, 1)
    assert config.recompute_granularity == "selective" and config.recompute_modules == ("core_attn",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0


def test_saved_whole_and_read_back(tmp_path):
    config = parse_args(VARIED).replace(tokenizer_vocab_size=1001, padded_vocab_size=1024)
    run_config.save(config, tmp_path)
    saved = json.loads((tmp_path / "run_config.json").read_text())
    flags = {action.dest for action in build_parser()._actions if action.dest != "help" and not is_refused(action)}
    assert set(saved) == flags | set(DERIVED) | {"run_config_format"}  # every flag, by construction
    assert run_config.load(tmp_path) == config


def test_saved_flags_rebuild_the_same_config():
    """What export does: the saved config's flags, parsed again, give the config back."""
    config = parse_args(VARIED)
    assert parse_args(config.flags(ALL)) == config


def test_the_architecture_rule_covers_what_fixes_the_saved_tensors():
    assert {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "kv_channels", "max_position_embeddings", "position_embedding_type", "normalization", "swiglu",
            "untie_embeddings_and_output_weights", "disable_bias_linear", "num_experts", "moe_ffn_hidden_size",
            "moe_layer_pattern", "moe_router_type", "tokenizer_vocab_size"} <= RunConfig.names([ARCHITECTURE])
    assert not {"lr", "train_iters", "tensor_model_parallel_size", "moe_router_topk", "padded_vocab_size",
                "seq_length", "hidden_dropout"} & RunConfig.names([ARCHITECTURE])


# what the code before format 2 wrote (checkpointing.run_config): a subset of fields
FORMAT_1 = {
    "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 4, "num_query_groups": None,
    "kv_channels": None, "max_position_embeddings": 32, "position_embedding_type": "rope",
    "normalization": "RMSNorm", "swiglu": True, "untie_embeddings_and_output_weights": False,
    "disable_bias_linear": False, "num_experts": 4, "moe_ffn_hidden_size": 256, "moe_layer_pattern": [0, 1, 1, 1],
    "moe_router_type": "sam", "tokenizer_vocab_size": 1001, "tensor_model_parallel_size": 2,
    "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 2, "norm_epsilon": 1e-5, "rotary_base": 10000,
    "rotary_percent": 1.0, "moe_router_topk": 2, "moe_router_num_groups": None, "moe_router_group_topk": None,
    "tokenizer_type": "NullTokenizer", "vocab_file": None, "merge_file": None, "tokenizer_model": None,
    "vocab_size": 1000, "make_vocab_size_divisible_by": 128, "padded_vocab_size": 1280, "init_method_std": 0.02,
    "moe_routing_flags": {"sam_num_groups": 2, "sam_renormalize_gates": True, "sam_capacity_factor": None},
    "use_distributed_optimizer": True, "distrib_optim_sharding_type": "fully_reshardable", "world_size": 4,
}


def test_format_1_run_configs_still_load():
    from megatron_moe.checkpointing import saved_sharding_type

    config = run_config.from_json(json.dumps(FORMAT_1))
    assert (config.sam_num_groups, config.sam_renormalize_gates, config.moe_layer_pattern) == (2, True, (0, 1, 1, 1))
    assert saved_sharding_type(config) == "fully_reshardable" and config.padded_vocab_size == 1280
    assert config.eval_interval == 1000  # the default when it was written
    rebuilt = parse_args(config.flags((ARCHITECTURE, MODEL, TOKENIZER)) + ["--train-iters", "1", "--lr", "0",
                                                                              "--micro-batch-size", "1", "--mock-data"])
    assert all(getattr(rebuilt, name) == getattr(config, name) for name in RunConfig.names([ARCHITECTURE])
               if name != "tokenizer_vocab_size")
    old = dict(FORMAT_1, distrib_optim_sharding_type=None)
    del old["distrib_optim_sharding_type"]
    assert saved_sharding_type(run_config.from_json(json.dumps(old))) == "dp_reshardable"  # before it was recorded


def test_format_2_run_configs_keep_their_meaning():
    """Before format 3 MoE models had no linear biases whatever --disable-bias-linear said, and
    --num-query-groups alone meant grouped-query attention."""
    values = json.loads(run_config.to_json(parse_args(REQUIRED)))
    del values["group_query_attention"]
    values.update(run_config_format=2, disable_bias_linear=False, num_query_groups=2)
    config = run_config.from_json(json.dumps(values))
    assert (config.disable_bias_linear, config.group_query_attention, config.num_query_groups) == (True, True, 2)
    values.update(num_experts=None, num_query_groups=None)
    dense = run_config.from_json(json.dumps(values))
    assert (dense.disable_bias_linear, dense.group_query_attention, dense.num_query_groups) == (False, False, 1)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds no JSON object"),
    (json.dumps({"run_config_format": 2, "num_layers": 2, "flag_from_the_future": 1}),
     "settings this version does not know (flag_from_the_future)"),
])
def test_damaged_or_newer_run_configs_are_one_line_errors(text, message, tmp_path):
    (tmp_path / "run_config.json").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        run_config.load(tmp_path)
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)


def test_attention_backends_are_megatron_cores():
    from megatron.core.transformer.enums import AttnBackend

    assert ATTENTION_BACKENDS == tuple(backend.name for backend in AttnBackend)


def test_parsing_imports_no_megatron_core():
    probe = ("import sys; import megatron_moe.run_config, megatron_moe.moe.scheme_flags; "
             "print(sorted(m for m in sys.modules if m.startswith('megatron.')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def _module_imports(path):
    """The megatron_moe modules ``path`` imports at its top level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_moe"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("megatron_moe")}
    return found


def test_imports_run_one_way():
    package = REPO / "megatron_moe"
    modules = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
               for path in package.rglob("*.py")}
    graph = {name: _module_imports(path) & set(modules) - {name} for name, path in modules.items()}
    visiting, done = [], set()

    def visit(name):
        assert name not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        if name in done:
            return
        visiting.append(name)
        for imported in graph[name]:
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)
