"""The thread count follows the load: a core that another process keeps busy is left to it while generating."""
import subprocess
import sys
import time

import pytest
import torch

from mmchat import threads


def test_a_core_mostly_used_by_others_is_left_to_them():
    assert threads.threads_for(2, 0.0) == 2
    assert threads.threads_for(2, 0.4) == 2
    assert threads.threads_for(2, 0.9) == 1
    assert threads.threads_for(2, 2.0) == 1  # never fewer than one
    assert threads.threads_for(8, 1.0) == 7
    assert threads.threads_for(8, 2.7) == 5


@pytest.mark.skipif(threads.physical_cores() < 2, reason="needs 2 cores to have one to give up")
def test_a_busy_process_beside_us_takes_a_thread_away_and_a_pinned_count_stays(monkeypatch):
    monkeypatch.delenv("MMCHAT_THREADS", raising=False)
    before = torch.get_num_threads()
    follow = threads.LoadFollower(interval=0.2)
    threads.set_threads(follow.cores)  # as mmchat.load does
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = []
        for _ in range(10):
            time.sleep(0.25)
            seen.append(follow())
        assert min(seen) == follow.cores - 1, (seen, follow.others)
        assert follow.others > 0.5
        monkeypatch.setenv("MMCHAT_THREADS", str(follow.cores))  # pinned by the user: left alone
        threads.set_threads(follow.cores)
        for _ in range(3):
            time.sleep(0.25)
            assert follow() == follow.cores
        monkeypatch.delenv("MMCHAT_THREADS")
        threads.set_threads(1)
        torch.set_num_threads(follow.cores)  # then set by the program itself, not by mmchat: left alone too
        for _ in range(3):
            time.sleep(0.25)
            assert follow() == follow.cores
    finally:
        busy.kill()
        torch.set_num_threads(before)
