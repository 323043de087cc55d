"""CheckpointMixin (models/checkpoint.py) on a network that is not a U-Net: the release-file
layouts, wrapper prefixes, and one clear error for each kind of file it cannot use."""
import pytest
import torch
from torch import nn

from sparse_attn.models.checkpoint import CheckpointError, CheckpointMixin


class TinyNet(CheckpointMixin, nn.Module):
    """An EDSR-like head / body / tail, with a buffer, as a stand-in for any network."""

    def __init__(self, channels=4, blocks=2):
        super().__init__()
        self.channels = channels
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks)])
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)
        self.register_buffer("escape_NaN", torch.tensor([1e-4]))

    def _config_summary(self):
        return f"channels={self.channels}"


def _random_state_dict(**kwargs):
    torch.manual_seed(0)
    net = TinyNet(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net.state_dict()


def _assert_loaded(net, state_dict):
    for key, value in net.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


@pytest.mark.parametrize("layout", ["params", "params_ema", "bare", "dataparallel", "basicsr_dataparallel"])
def test_release_layouts_load(tmp_path, layout):
    state_dict = _random_state_dict()
    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    saved = {"params": {"params": state_dict}, "params_ema": {"params_ema": state_dict}, "bare": state_dict,
             "dataparallel": prefixed, "basicsr_dataparallel": {"params": prefixed}}[layout]
    path = tmp_path / "net.pth"
    torch.save(saved, path)
    _assert_loaded(TinyNet().load_pretrained(path), state_dict)
    _assert_loaded(TinyNet().load_pretrained(str(path)), state_dict)
    _assert_loaded(TinyNet().load_pretrained(saved), state_dict)  # the loaded object itself
    _assert_loaded(TinyNet.from_pretrained(path, channels=4), state_dict)


def test_a_dataparallel_state_dict_loads_and_is_left_as_it_was():
    wrapped = nn.DataParallel(TinyNet())
    with torch.no_grad():
        wrapped.module.head.weight.fill_(3.0)
    state_dict = wrapped.state_dict()
    keys = list(state_dict)
    net = TinyNet().load_pretrained(state_dict)
    assert torch.equal(net.head.weight, wrapped.module.head.weight)
    assert list(state_dict) == keys and "module" in state_dict._metadata  # the caller's dict is untouched


def test_params_is_preferred_and_param_key_chooses(tmp_path):
    plain, ema = _random_state_dict(), {k: v + 1 for k, v in _random_state_dict().items()}
    checkpoint = {"params": plain, "params_ema": ema}
    _assert_loaded(TinyNet().load_pretrained(checkpoint), plain)
    _assert_loaded(TinyNet().load_pretrained(checkpoint, param_key="params_ema"), ema)
    with pytest.raises(CheckpointError, match="no 'params_ema' in the checkpoint"):
        TinyNet().load_pretrained({"params": plain}, param_key="params_ema")


def test_from_pretrained_passes_the_constructor_arguments(tmp_path):
    state_dict = _random_state_dict(channels=6, blocks=3)
    path = tmp_path / "net.pth"
    torch.save(state_dict, path)
    net = TinyNet.from_pretrained(path, channels=6, blocks=3)
    assert net.channels == 6 and len(net.body) == 3
    _assert_loaded(net, state_dict)


class _WritesAFileWhenUnpickled:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _not_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    code = _WritesAFileWhenUnpickled()
    code.marker = tmp_path / "the_code_ran"
    torch.save({"params": _random_state_dict(), "optimizer": code}, tmp_path / "code.pth")
    return ["notes.txt", "empty.pth", "image.png", "code.pth"]


def test_a_file_that_is_not_a_checkpoint_gets_one_clear_line(tmp_path):
    for name in _not_checkpoints(tmp_path):
        with pytest.raises(CheckpointError) as info:
            TinyNet().load_pretrained(tmp_path / name)
        message = str(info.value)
        assert message == f"{tmp_path / name}: not a checkpoint that can be read safely (expected a torch.save " \
                          f"file of tensors, such as a state_dict; code in a file is never run)"
        # torch's own message, which advises weights_only=False, is neither shown nor chained.
        assert info.value.__cause__ is None and info.value.__suppress_context__
        assert "weights_only" not in message
    assert not (tmp_path / "the_code_ran").exists(), "the pickled code must not run"


def test_a_missing_file_is_the_os_error():
    with pytest.raises(FileNotFoundError):
        TinyNet().load_pretrained("no/such/file.pth")


def test_a_checkpoint_of_another_network_names_the_keys_briefly():
    other = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)]).state_dict()  # 10 keys
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        net.load_pretrained(other)
    lines = str(info.value).splitlines()
    assert lines[0] == "the state_dict does not match TinyNet(channels=4): no key in common, " \
                       "a checkpoint of another network?"
    assert lines[1] == "  missing keys (9): body.0.bias, body.0.weight, body.1.bias, body.1.weight, escape_NaN, " \
                       "... (4 more)"
    assert lines[2] == "  unexpected keys (10): 0.bias, 0.weight, 1.bias, 1.weight, 2.bias, ... (5 more)"
    assert len(lines) == 3
    _assert_loaded(net, before)  # nothing loaded


def test_shapes_that_differ_are_named():
    with pytest.raises(CheckpointError, match=r"shapes differ \(checkpoint vs model\) \(7\): head\.weight \(6, 3, 3, 3\) vs \(4, 3, 3, 3\), "
                       r"head\.bias \(6,\) vs \(4,\), .*\(2 more\)$"):
        TinyNet(channels=4).load_pretrained(_random_state_dict(channels=6))


def test_non_strict_loads_the_shared_keys_only():
    state_dict = _random_state_dict(blocks=2)
    net = TinyNet(blocks=3)
    third = net.body[2].weight.clone()
    net.load_pretrained(state_dict, strict=False)
    assert torch.equal(net.head.weight, state_dict["head.weight"])
    assert torch.equal(net.body[2].weight, third)
    with pytest.raises(CheckpointError, match="missing keys"):
        TinyNet(blocks=3).load_pretrained(state_dict)  # strict by default
    with pytest.raises(CheckpointError, match="no key in common"):
        TinyNet().load_pretrained({"other.weight": torch.zeros(1)}, strict=False)


def test_what_is_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a state_dict or a {'params': state_dict} checkpoint, got Tensor"):
        TinyNet().load_pretrained(path)
    training = {"epoch": 7, "state_dict": _random_state_dict()}
    with pytest.raises(CheckpointError, match="these entries are not tensors: epoch, state_dict"):
        TinyNet().load_pretrained(training)
    with pytest.raises(TypeError, match="path_or_state_dict: expected a file path or a state_dict, got int"):
        TinyNet().load_pretrained(3)
