"""Accuracy evaluation: a real model offline, real multiple-choice tasks, and ``gradprune eval``."""
