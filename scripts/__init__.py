"""AE-FLOW bundle code: what MONAI, Ignite, FrEIA and scikit-learn do not already provide.

One module per concept: ``encoders``, ``flow`` and ``decoder`` (network parts), ``networks`` (AE-FLOW),
``losses`` (equation 1), ``scores`` (equation 2 and anomaly maps), ``transforms``, ``datalists`` and
``synthetic`` (data), ``engines`` and ``handlers`` (Ignite workflows), ``metrics`` and ``reports``.
"""
