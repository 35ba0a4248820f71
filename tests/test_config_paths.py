"""`config_paths.absolute_paths`: a config's relative local paths joined to the directory given, names and
everything else as written."""

from __future__ import annotations

from nextquill_jax.config import load_config
from nextquill_jax.config_paths import absolute_paths


def _config(**sections):
    """A valid config dict (a tiny preset model) with `sections` updating its sections."""
    raw = {
        "model": {"preset": "qwen2.5-0.5b", "overrides": {"num_layers": 1}},
        "data": {"format": "generic"},
        "train": {},
        "loss": {},
        "logging": {},
    }
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def test_relative_local_paths_are_joined_to_the_base_and_names_absolute_paths_and_nulls_are_kept(
    tmp_path, monkeypatch
):
    base, home = tmp_path / "base", tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    (base / "models" / "mine").mkdir(parents=True)
    (base / "ref").mkdir()
    (base / "tpl").mkdir()
    (base / "tpl" / "mine.yaml").write_text("")
    (base / "qwen2.5").write_text("")  # a file, not a tokenizer directory: `qwen2.5` stays the packaged name
    given = _config(
        model={
            "preset": None,
            "overrides": {},
            "path": "models/mine",
            "lora": {"init_from": "adapters"},  # a path, existing or not
        },
        data={
            "sources": ["data/**/*.jsonl", "/abs/records.jsonl", "~/more/*.jsonl"],
            "meta": ["meta.jsonl"],
            "template": "tpl/mine.yaml",
            "tokenizer": "qwen2.5",
        },
        loss={"reference_model": "ref"},
        train={"workdir": "/runs/one", "data_dir": "prep"},
        logging={"tensorboard_dir": None},
    )
    expected = _config(
        model={
            "preset": None,
            "overrides": {},
            "path": f"{base}/models/mine",
            "lora": {"init_from": f"{base}/adapters"},
        },
        data={
            "sources": [f"{base}/data/**/*.jsonl", "/abs/records.jsonl", f"{home}/more/*.jsonl"],
            "meta": [f"{base}/meta.jsonl"],
            "template": f"{base}/tpl/mine.yaml",
            "tokenizer": "qwen2.5",
        },
        loss={"reference_model": f"{base}/ref"},
        train={"workdir": "/runs/one", "data_dir": f"{base}/prep"},
        logging={"tensorboard_dir": None},
    )
    assert absolute_paths(load_config(None, base=given), base) == load_config(None, base=expected)


def test_packaged_and_built_in_names_urls_and_defaults_are_left_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing there: every name stays a name
    given = load_config(
        None,
        base=_config(
            model={"preset": None, "overrides": {}, "path": "smollm2-135m", "lora": {"rank": 4}},
            data={"template": "plain", "tokenizer": "smollm2-135m"},
            loss={"reference_model": "base", "dce": "fixed", "variant": "dce"},
            logging={"tensorboard_dir": "gs://bucket/tb"},
        ),
    )
    assert given.train.data_dir is None and given.data.sources == [] and given.model.lora.init_from is None
    assert absolute_paths(given, tmp_path) == given


def test_a_tilde_of_no_user_is_left_as_written_for_its_resolver_to_refuse(tmp_path):
    # `~nosuchuser/...` made `expanduser` raise RuntimeError: `train` and `data prepare` ended in a
    # traceback, where before the paths were absolute the source resolver refused it with an `error:` line.
    unknown = "~no_such_user_nextquill"
    given = load_config(
        None,
        base=_config(
            model={"preset": None, "overrides": {}, "path": f"{unknown}/model"},
            data={"sources": [f"{unknown}/x.jsonl", "rel.jsonl"], "tokenizer": f"{unknown}/tok"},
            train={"data_dir": f"{unknown}/prep"},
        ),
    )
    made = absolute_paths(given, tmp_path)
    assert made.model.path == f"{unknown}/model" and made.data.tokenizer == f"{unknown}/tok"
    assert made.data.sources == [f"{unknown}/x.jsonl", f"{tmp_path}/rel.jsonl"]
    assert made.train.data_dir == f"{unknown}/prep"


def test_an_empty_path_stays_empty_so_its_default_in_the_workdir_still_applies(tmp_path):
    # `train.data_dir: ""` (and `logging.tensorboard_dir: ""`) mean the default, `<workdir>/prepared` (and
    # `<workdir>/tensorboard`), to their readers; joined to the base they had become the current directory,
    # where `train` would then prepare its data.
    from nextquill_jax.train.metrics_log import tensorboard_dir
    from nextquill_jax.train.workdir import data_dir_of

    given = load_config(None, base=_config(train={"data_dir": ""}, logging={"tensorboard_dir": ""}))
    made = absolute_paths(given, tmp_path)
    assert made == given
    workdir = tmp_path / "run"
    assert data_dir_of(made, workdir) == workdir / "prepared"
    assert tensorboard_dir(made.logging, workdir) == workdir / "tensorboard"


def test_a_relative_source_pattern_matches_under_a_folder_whose_name_holds_glob_characters(tmp_path):
    """From `g[1]/`, the relative pattern `data/[ab].jsonl` was joined as `.../g[1]/data/[ab].jsonl`, whose
    `[1]` matched the folder `g1`: a decoy there was prepared instead, without a word."""
    from nextquill_jax.data.sources.read import expand_paths

    base, decoy = tmp_path / "g[1]", tmp_path / "g1"
    for folder, names in ((base, ("a.jsonl", "b.jsonl")), (decoy, ("a.jsonl",))):
        (folder / "data").mkdir(parents=True)
        for name in names:
            (folder / "data" / name).write_text("{}\n")
    cfg = absolute_paths(load_config(None, base=_config(data={"sources": ["data/[ab].jsonl"]})), base)
    found = expand_paths(list(cfg.data.sources), "data.sources")
    assert found == [base / "data" / "a.jsonl", base / "data" / "b.jsonl"]


def test_a_file_named_with_glob_characters_under_such_a_folder_is_that_file(tmp_path):
    """`data[1].jsonl` names that file (expand_paths' rule), also from a folder `g[1]/` whose glob characters
    the join escapes (it was globbed, and matched `data1.jsonl` or nothing)."""
    from nextquill_jax.data.sources.read import expand_paths

    base = tmp_path / "g[1]"
    base.mkdir()
    for name in ("data[1].jsonl", "data1.jsonl"):
        (base / name).write_text("{}\n")
    cfg = absolute_paths(load_config(None, base=_config(data={"sources": ["data[1].jsonl"]})), base)
    assert expand_paths(list(cfg.data.sources), "data.sources") == [base / "data[1].jsonl"]


def test_names_that_are_also_local_folders_or_files_are_read_as_their_resolvers_read_them(tmp_path):
    """Per the module's rules, with a folder of each name beside them: a template name without a suffix stays
    the built-in template (`plain`), `reference_model: base` stays the frozen base, a `.gguf` tokenizer is
    local only as an existing file (`gone.gguf` exists nowhere: left as written), and a `path` field such as
    `logging.tensorboard_dir` is joined whether or not it exists yet."""
    for folder in ("plain", "base", "tok"):
        (tmp_path / folder).mkdir()
    (tmp_path / "tok.gguf").write_text("")
    given = load_config(
        None,
        base=_config(
            model={"preset": None, "overrides": {}, "path": "smollm2-135m", "lora": {"rank": 4}},
            data={"template": "plain", "tokenizer": "gone.gguf"},
            loss={"reference_model": "base", "dce": "fixed", "variant": "dce"},
            logging={"tensorboard_dir": "tb"},
        ),
    )
    made = absolute_paths(given, tmp_path)
    assert (made.data.template, made.loss.reference_model) == ("plain", "base")
    assert made.data.tokenizer == "gone.gguf"
    assert made.logging.tensorboard_dir == f"{tmp_path}/tb"
    for tokenizer in ("tok.gguf", "tok"):  # an existing .gguf file, a folder
        cfg = load_config(None, base=_config(data={"tokenizer": tokenizer}))
        assert absolute_paths(cfg, tmp_path).data.tokenizer == f"{tmp_path}/{tokenizer}"
