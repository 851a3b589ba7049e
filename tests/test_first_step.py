"""The time-to-first-step line both recipes print (lora_vision.training.first_step)."""

from __future__ import annotations

import re
import time

import torch

from lora_vision.training.first_step import report_first_step

LINE = re.compile(r"first step done ([\d.]+) s after start \(imports and setup ([\d.]+) s, (?:(capture|compile \+ "
                  r"capture) ([\d.]+) s, )?first step ([\d.]+) s(, compile included)?\)")


def test_the_parts_add_up_to_the_time_since_start(capsys):
    now = time.perf_counter()
    line = report_first_step(torch.device("cpu"), now - 10.0, now - 3.0, compiled=False, static_s=2.0, prefix="[x] ")
    assert capsys.readouterr().out == line + "\n" and line.startswith("[x] first step done")
    total, setup, what, built, first, compile_note = LINE.search(line).groups()
    assert what == "capture" and float(built) == 2.0 and compile_note is None
    assert abs(float(setup) - 5.0) < 0.05 and 3.0 <= float(first) < 3.5 and 10.0 <= float(total) < 10.5


def test_without_a_static_step_a_compiled_first_step_says_it_holds_the_compile():
    now = time.perf_counter()
    line = report_first_step(torch.device("cpu"), now - 4.0, now - 1.0, compiled=True)
    total, setup, what, built, first, compile_note = LINE.search(line).groups()
    assert what is None and built is None and compile_note == ", compile included"
    assert abs(float(setup) - 3.0) < 0.05
    line = report_first_step(torch.device("cpu"), now - 4.0, now - 1.0, compiled=True, static_s=1.5)
    assert "compile + capture 1.5 s" in line and "compile included" not in line
    line = report_first_step(torch.device("cpu"), now - 4.0, now - 1.0, compiled=True, static_s=0.0)
    assert "compile + capture 0.0 s" in line and "compile included" not in line
