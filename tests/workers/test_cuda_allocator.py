"""A GPU worker's allocator settings: expandable segments by default, the user's own settings kept."""

from rayquant.workers.cuda_allocator import ALLOC_CONF, ALLOC_CONF_VAR, configure_cuda_allocator


def test_expandable_segments_unless_the_user_chose_settings() -> None:
    env: dict[str, str] = {}
    configure_cuda_allocator(env)
    assert env == {ALLOC_CONF_VAR: "expandable_segments:True"} and ALLOC_CONF == env[ALLOC_CONF_VAR]
    mine = {ALLOC_CONF_VAR: "max_split_size_mb:512"}
    configure_cuda_allocator(mine)
    assert mine == {ALLOC_CONF_VAR: "max_split_size_mb:512"}
