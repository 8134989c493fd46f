"""Your model, registered for fedslim (the only code this example needs)."""

from torch import nn

from fedslim.task.models import register_model


@register_model("vib_cnn")
def vib_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small 1-D CNN for (channels, time) sensor windows."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv1d(channels, 16, kernel_size=5, padding=2), nn.ReLU(),
        nn.Conv1d(16, 32, kernel_size=5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(8), nn.Flatten(),
        nn.Linear(32 * 8, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


@register_model("vib_student")
def vib_student(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A compact student for vib_cnn (distill=true)."""
    return nn.Sequential(
        nn.Conv1d(input_shape[0], 8, kernel_size=5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(8 * 4, num_classes),
    )
