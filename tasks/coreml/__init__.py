"""Core ML: conversion and spec checks (convert), and the MLflow pyfunc that serves an export (pyfunc).

Kept empty: ``pyfunc`` is imported by promote without coremltools or torch.
"""
