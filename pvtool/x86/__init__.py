"""The x86-64 back end: encoder (encode), instruction selection (isel),
register allocation (regalloc), frames (frame) and code generation (codegen).
"""
