"""Small helpers every other folder may use: argument checks, CLI argument
types, linear algebra.
"""
