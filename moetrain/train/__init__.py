"""moetrain.train"""
