import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """The real embedded model, pulled once into the shared cache (~/.cache/mmchat) and reused."""
    from mmchat import registry
    return registry.resolve("smollm2", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import mmchat
    return mmchat.load(str(smollm2_path), progress=False)
