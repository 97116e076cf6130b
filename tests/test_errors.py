import os
import signal
import threading
import time

import pytest

from shoal.errors import deferred_interrupt


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # where the handler would run


def test_deferred_interrupt_delivers_a_ctrl_c_once_the_block_is_done(ctrl_c_raises):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            _ctrl_c()
            done.append(True)
    assert done and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with deferred_interrupt():  # no Ctrl-C: nothing to deliver
        pass


def test_a_second_ctrl_c_cuts_the_deferred_block_short(ctrl_c_raises):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():  # a block that hangs: the second Ctrl-C is the way out
            _ctrl_c()
            reached.append(1)
            _ctrl_c()
            reached.append(2)
    assert reached == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_interrupt_hands_the_ctrl_c_to_the_handler_in_place_and_runs_plainly_off_the_main_thread(
        ctrl_c_raises):
    heard = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))
    try:
        with deferred_interrupt():
            _ctrl_c()
            assert not heard
        time.sleep(0.05)
        assert heard == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)

    ran = []

    def block():
        with deferred_interrupt():
            ran.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=block)
    thread.start()
    thread.join()
    assert ran == [signal.default_int_handler]
