import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up and contention with other jobs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
