"""Host and device copies that never wait for the stream: small tensors from host values, and
results on their way back."""

import torch


def by_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One value per row, in `like`'s dtype on its device."""
    return to_device(values, like.dtype, like.device)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor from host values, copied as `copy_to_device` copies."""
    return copy_to_device(torch.tensor(values, dtype=dtype), device)


def copy_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: on a GPU through pinned memory and without a sync, so the copy
    is queued behind work already on the stream. A plain `.to(device)` (or `torch.tensor(
    values, device=...)`) waits for the whole stream, which would stall an engine that
    queues the next step before this one is read back."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def start_host_copy(tensors: tuple) -> tuple[tuple, "torch.cuda.Event | None"]:
    """`tensors` (None kept as None) on their way to the host, and the event marking their
    arrival: on a GPU copied into pinned host memory behind the work already queued, without
    a sync; on the CPU the tensors themselves, and no event."""
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cpu":
        return tensors, None
    host = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
        t, non_blocking=True) for t in tensors)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))
    return host, copied
