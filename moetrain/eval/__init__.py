"""moetrain.eval"""
