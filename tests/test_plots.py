from PIL import Image

from tests.conftest import cli, mnist_args


def png_size(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        return im.size


def test_every_train_run_writes_loss_png_with_an_accuracy_panel_when_there_is_one(tiny_mnist, tmp_path):
    result = cli("train", "--epochs", "3", "--set", "name=reg", "--set", "scheduler={name: steplr, step_size: 1}")
    assert result.exit_code == 0, result.output
    result = cli("train", *mnist_args(tiny_mnist, "--epochs", "2", "--set", "name=mnist"))
    assert result.exit_code == 0, result.output
    reg_w, reg_h = png_size(tmp_path / "runs" / "reg" / "loss.png")
    mnist_w, mnist_h = png_size(tmp_path / "runs" / "mnist" / "loss.png")
    assert reg_w > 300 and reg_h > 200
    assert mnist_w > 1.5 * reg_w  # loss and lr on the left, validation accuracy on the right
