"""The tools around the library: the ``kvpolicy`` command (list, demo, eval, inspect) and the
embedded model. The core (the rest of ``kvpolicy``, ``kvpolicy_kernels``) never imports them."""
