"""moetrain.models"""
