# bundle.s: GNU as macros that make gcc's output obey the PV code rules
# (docs/abi.md, "What the validator guarantees" and "Writing a guest in C").
#
#     gcc ... -fno-jump-tables -Wa,ckit/bundle.s file.c
#
# GNU as reads this file before the compiler's output, so the macros below
# replace the `ret` and `call` instructions gcc writes.
#
# - Every instruction stays inside one 32-byte bundle (.bundle_align_mode 5).
# - `ret` becomes a masked return: pop the return address into r11 (free at
#   a return), clear its low five bits, jump; the and/jmp pair is one unit.
# - `call TARGET` is padded so that it ends on a bundle boundary: the return
#   address is then a bundle start, where a masked return can land.  Only
#   direct calls obey the rules: `call *%reg` and `call *mem` are refused by
#   the validator (use PV_CALL_MASKED from pvguest.h).

.bundle_align_mode 5

.macro ret
    popq %r11
    .bundle_lock
    andq $-32, %r11
    jmpq *%r11
    .bundle_unlock
.endm

# 9 + 9 + 9 bytes of NOPs and a 5-byte call make one whole bundle.
.macro call target:vararg
    .bundle_lock
    {disp32} nopw 0(%rax,%rax,1)
    {disp32} nopw 0(%rax,%rax,1)
    {disp32} nopw 0(%rax,%rax,1)
    callq \target
    .bundle_unlock
.endm
