"""Ctrl-C while `pdserve` is still importing is recorded, not raised (services/early_interrupt.py)."""

import os
import signal

from services import early_interrupt


def test_an_interrupt_while_recording_is_counted_and_the_previous_handler_comes_back():
    previous = signal.getsignal(signal.SIGINT)
    before = early_interrupt.received()
    with early_interrupt.Recording():
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt here without the recording
        signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a C call: pending handlers run on return
        assert early_interrupt.received() == before + 1
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_command_that_stops_recording_handles_sigint_itself_again():
    previous = signal.getsignal(signal.SIGINT)
    with early_interrupt.Recording() as recording:
        recording.stop()
        assert signal.getsignal(signal.SIGINT) is previous
    assert signal.getsignal(signal.SIGINT) is previous
