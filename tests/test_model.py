import io
import json
import logging
import pickle

import pytest
import safetensors.torch
import torch

from insectlib.errors import InsectError
from insectlib.model import network as M
from insectlib.model.meta import model_id


@pytest.mark.parametrize(("arch", "head"), [("vgg16", "classifier.6"), ("resnet18", "fc")])
def test_head_is_replaced_and_only_it_trains(arch, head):
    m = M.build_model(arch, 3, "random")
    assert M.head_name(m) == head
    assert m.get_submodule(head).out_features == 3
    M.apply_freeze(m, "trunk")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    M.apply_freeze(m, "none")
    assert all(p.requires_grad for p in m.parameters())


def test_frozen_trunk_stays_in_eval_mode():
    m = M.build_model("vgg16", 3, "random")
    M.set_train_mode(m, "trunk")
    assert m.get_submodule("classifier.6").training
    assert not m.classifier[2].training  # dropout in the frozen part is off
    M.set_train_mode(m, "none")
    assert m.classifier[2].training


def test_save_and_load_round_trip(tmp_path):
    m = M.build_model("resnet18", 4, "random")
    meta = M.save_model(
        str(tmp_path), m, M.ModelMeta(classes=list("abcd"), arch="resnet18", image_size=64)
    )
    assert len(meta.model_id) == 16
    loaded, meta2 = M.load_model(str(tmp_path))
    assert meta2.model_id == meta.model_id and meta2.classes == list("abcd")
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_weights_from_state_dict_files(tmp_path):
    base = M.torchvision.models.get_model("resnet18", weights=None)
    torch.save(base.state_dict(), tmp_path / "w.pth")
    safetensors.torch.save_file(base.state_dict(), tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        m = M.build_model("resnet18", 2, str(tmp_path / name))
        assert torch.equal(m.conv1.weight, base.conv1.weight)
        assert m.fc.out_features == 2


def test_an_insect_models_weights_start_a_run_and_weights_that_do_not_fit_are_one_line(tmp_path):
    """An insect model's own model.safetensors (a head of its classes) could not be
    --weights: loaded whole into the 1,000-class skeleton before its head was replaced,
    it was refused with torch's every size mismatch. The head is not looked at; a trunk
    that does not fit is one line naming the first few tensors."""
    trained = M.build_model("resnet18", 3, "random")
    M.save_model(
        str(tmp_path / "m1"),
        trained,
        M.ModelMeta(classes=list("abc"), arch="resnet18", image_size=32),
    )
    weights = str(tmp_path / "m1" / M.WEIGHTS_FILE)
    again = M.build_model("resnet18", 5, weights)
    assert torch.equal(again.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)
    assert again.fc.out_features == 5
    with pytest.raises(InsectError) as refused:
        M.build_model("resnet34", 3, weights)
    line = str(refused.value)
    assert line.startswith(
        f"--weights {weights} does not fit resnet34: 96 tensors missing from it ("
    )
    assert "\n" not in line and len(line) < 400
    state = {k: v for k, v in trained.state_dict().items()}
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(state, tmp_path / "odd.safetensors")
    shapes = M.safetensors_shapes(str(tmp_path / "odd.safetensors"))
    with pytest.raises(InsectError) as refused:
        M.check_trunk("odd", shapes, "resnet18")
    assert str(refused.value) == (
        "--weights odd does not fit resnet18: 1 tensor not resnet18's (extra.weight); 1 tensor "
        "of other shapes than resnet18's (conv1.weight [64, 3, 3, 3], not [64, 3, 7, 7])"
    )


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1), "evil": _Evil()}, buf)
    (tmp_path / "evil.pth").write_bytes(buf.getvalue())
    with pytest.raises(InsectError, match="refusing to load .*evil.pth"):
        M.load_state_dict_file(str(tmp_path / "evil.pth"))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InsectError):
        M.load_state_dict_file(str(tmp_path / "plain.pkl"))


def test_meta_is_validated_before_weights(tmp_path):
    with pytest.raises(InsectError, match="not a model directory: .*meta.json does not exist"):
        M.load_model(str(tmp_path))
    (tmp_path / "meta.json").write_text(
        json.dumps({"classes": ["a"], "arch": "nope", "image_size": 8})
    )
    with pytest.raises(
        InsectError, match="at least 2 distinct.*unknown arch 'nope'.*bad image_size"
    ):
        M.load_model(str(tmp_path))
    meta = {"classes": ["a", "b"], "arch": "resnet18", "image_size": 64}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    safetensors.torch.save_file({"fc.weight": torch.zeros(3, 512)}, tmp_path / "model.safetensors")
    with pytest.raises(InsectError, match="is not the model meta.json describes"):
        M.load_model(str(tmp_path))  # no model_id: the weights are not those meta.json names
    weights_id = model_id((tmp_path / "model.safetensors").read_bytes())  # id_version 1
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "model_id": weights_id}))
    for check in (M.load_model, lambda uri: M.check_weights(uri, M.read_meta(uri))):
        with pytest.raises(InsectError, match="does not match resnet18 with 2 classes"):
            check(str(tmp_path))


def test_unknown_arch():
    with pytest.raises(InsectError, match="unknown --arch 'vgg17'"):
        M.build_model("vgg17", 3, "random")


@pytest.mark.parametrize(
    "arch", ["vgg16", "resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"]
)
def test_embedding_is_what_the_head_reads(arch):
    """WithEmbedding moves the head out of the model: the logits must be the model's own,
    and the embedding exactly what the head was given."""
    torch.manual_seed(0)
    m = M.build_model(arch, 5, "random").eval()
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    seen = []
    hook = m.get_submodule(M.head_name(m)).register_forward_pre_hook(
        lambda mod, args: seen.append(args[0])
    )
    with torch.no_grad():
        expected = m(x)
        hook.remove()
        logits, embedding = M.WithEmbedding(m)(x)
    assert torch.equal(logits, expected) and torch.equal(embedding, seen[0])
    meta = M.ModelMeta(classes=list("abcde"), arch=arch, image_size=64)
    assert embedding.shape == (2, M.embedding_size(meta))
    # RegNet cannot be built on the meta device: the shape checks build it on the CPU.
    assert M._expected_shapes(meta) == shapes


@pytest.mark.parametrize("bad", [0, -1.5, 1e-300, 1e6, float("nan"), float("inf"), "2", True])
def test_meta_temperature_must_be_in_range(bad):
    """A temperature that would turn logits into inf or NaN is refused with meta.json."""
    meta = M.ModelMeta(classes=["a", "b"], arch="resnet18", image_size=32, temperature=bad)
    with pytest.raises(InsectError, match="'temperature' must be between 0.05 and 20.0 or null"):
        M.ModelMeta.from_json(meta.to_json(), "meta.json")


def test_compile_chatter_stays_off_the_console(capfd):
    """What torch and torchao print in every compiling model actor and that says nothing
    about the run is dropped; their other warnings stay."""
    from insectlib.model.precision import COMPILE_CHATTER, quiet_compile_chatter

    quiet_compile_chatter()
    from torch.utils import cpp_extension  # says "No CUDA runtime" where first imported

    cpp_extension.logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    cpp_extension.logger.warning("a warning that matters")
    for name, start in COMPILE_CHATTER.items():
        logging.getLogger(name).warning(start + " (the rest of the line)")
    err = capfd.readouterr().err
    assert "a warning that matters" in err
    assert not any(start in err for start in COMPILE_CHATTER.values())
