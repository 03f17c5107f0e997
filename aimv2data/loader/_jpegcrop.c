/* Crop-window JPEG decoding for the `pil` loader (aimv2data/loader/decode_turbo.py, issue 15 point 5).

   libjpeg-turbo's libjpeg API can decode part of an image: jpeg_crop_scanline() restricts the IDCT,
   upsampling and colour conversion to a column range, jpeg_skip_scanlines() passes over rows with
   Huffman decoding only, and decoding stops after the window's last row. No maintained Python binding
   exposes these (simplejpeg, PyTurboJPEG, imagecodecs, Pillow: whole image only), so this is the minimal
   one: the system's libjpeg-turbo (>= 1.5; Debian 12: libjpeg62-turbo 2.1.5, whose headers Pillow-SIMD's
   build already needs). Optional: when it is not built, decode_turbo.py decodes the whole image.

   decode(data, m, x0, y0, x1, y1, pad, max_pixels) decodes at scale m/8 the window given as fractions
   (x0, y0, x1, y1) of the image, widened by `pad` pixels of the scaled image on each side, to RGBX.
   Returns (pixels, x, y, w, h, width, height): the window's top-left (x, y) and size (w, h) in the
   scaled image (x and w as libjpeg aligned them to its iMCU columns) and the scaled image's size; or None
   when this path does not apply: not decodable, any libjpeg warning (corrupt data: the caller's Pillow
   path decides, as with simplejpeg's strict mode), a colour space other than YCbCr/RGB/grey (CMYK, YCCK:
   Pillow's Adobe handling is the reference), or more than max_pixels pixels (0: no limit). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 1005000
#error "needs libjpeg-turbo >= 1.5 (jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf env;
} error_mgr;

static void on_error(j_common_ptr cinfo) { longjmp(((error_mgr *)cinfo->err)->env, 1); }

/* level < 0: a warning, i.e. corrupt data libjpeg would decode past; refuse it (strict) */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) longjmp(((error_mgr *)cinfo->err)->env, 1);
}

typedef struct {
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    JDIMENSION x, y, w, h, width, height;    /* window; the scaled image (crop_scanline narrows output_width) */
} job;

static JDIMENSION clamp(double v, JDIMENSION hi) { return v <= 0 ? 0 : v >= hi ? hi : (JDIMENSION)v; }

/* Grey, 4:4:4, 4:2:2, 4:2:0: the samplings whose cropping and skipping libjpeg-turbo's own tests exercise
   (3.0.1 fixed a crop width error for 4x2/2x4 factors); others are decoded full width from the top. */
static int common_sampling(struct jpeg_decompress_struct *ci) {
    int h = ci->comp_info[0].h_samp_factor, v = ci->comp_info[0].v_samp_factor;
    if (h > 2 || v > h) return 0;
    for (int c = 1; c < ci->num_components; c++)
        if (ci->comp_info[c].h_samp_factor != 1 || ci->comp_info[c].v_samp_factor != 1) return 0;
    return 1;
}

/* Header, colour space, size limit, scale and the window's rows (GIL held: no pixel work). */
static int prepare(job *j, const unsigned char *data, size_t size, int m, const double *box, int pad,
                   double max_pixels) {
    struct jpeg_decompress_struct *ci = &j->cinfo;
    if (setjmp(j->err.env)) return -1;
    jpeg_mem_src(ci, data, (unsigned long)size);
    jpeg_read_header(ci, TRUE);
    if (ci->jpeg_color_space != JCS_YCbCr && ci->jpeg_color_space != JCS_RGB && ci->jpeg_color_space != JCS_GRAYSCALE)
        return -1;
    if (max_pixels > 0 && (double)ci->image_width * ci->image_height > max_pixels) return -1;
    ci->out_color_space = JCS_EXT_RGBX;
    ci->scale_num = m;
    ci->scale_denom = 8;
    jpeg_calc_output_dimensions(ci);
    j->width = ci->output_width;
    j->height = ci->output_height;
    JDIMENSION x1 = clamp(ceil(box[2] * ci->output_width) + pad, ci->output_width);
    JDIMENSION y1 = clamp(ceil(box[3] * ci->output_height) + pad, ci->output_height);
    int window = common_sampling(ci);
    j->x = window ? clamp(floor(box[0] * ci->output_width) - pad, ci->output_width) : 0;
    j->y = window ? clamp(floor(box[1] * ci->output_height) - pad, ci->output_height) : 0;
    if (!window) x1 = ci->output_width;
    if (x1 <= j->x || y1 <= j->y) return -1;
    j->w = x1 - j->x;
    j->h = y1 - j->y;
    return 0;
}

/* Start decompressing (a progressive JPEG's scans are all decoded here) and narrow the columns. */
static int start(job *j) {
    if (setjmp(j->err.env)) return -1;
    jpeg_start_decompress(&j->cinfo);
    if (j->w < j->cinfo.output_width) jpeg_crop_scanline(&j->cinfo, &j->x, &j->w);
    return 0;
}

/* Skip to the window's first row, read its rows into `out` (w * 4 bytes each), stop. */
static int read_rows(job *j, unsigned char *out) {
    JSAMPROW rows[16];
    JDIMENSION done = 0;
    if (setjmp(j->err.env)) return -1;
    if (j->y) jpeg_skip_scanlines(&j->cinfo, j->y);
    while (done < j->h) {
        JDIMENSION n = j->h - done < 16 ? j->h - done : 16;
        for (JDIMENSION i = 0; i < n; i++) rows[i] = out + (size_t)(done + i) * j->w * 4;
        JDIMENSION got = jpeg_read_scanlines(&j->cinfo, rows, n);
        if (got == 0) return -1;          /* no progress (cannot happen with an in-memory source) */
        done += got;
    }
    jpeg_abort_decompress(&j->cinfo);     /* the rows below the window are never decoded */
    return 0;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int m, pad, rc;
    double box[4], max_pixels;
    PyObject *pixels = NULL, *result = NULL;
    job j;
    if (!PyArg_ParseTuple(args, "y*iddddid", &data, &m, &box[0], &box[1], &box[2], &box[3], &pad, &max_pixels))
        return NULL;
    if (m < 1 || m > 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "scale %d/8 outside 1/8..8/8", m);
    }
    j.cinfo.err = jpeg_std_error(&j.err.pub);
    j.err.pub.error_exit = on_error;
    j.err.pub.emit_message = on_message;
    jpeg_create_decompress(&j.cinfo);
    rc = prepare(&j, data.buf, (size_t)data.len, m, box, pad, max_pixels);
    if (rc == 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = start(&j);
        Py_END_ALLOW_THREADS
    }
    if (rc == 0) {
        pixels = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)j.w * j.h * 4);
        if (pixels == NULL) {
            jpeg_destroy_decompress(&j.cinfo);
            PyBuffer_Release(&data);
            return NULL;
        }
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(pixels);
        Py_BEGIN_ALLOW_THREADS
        rc = read_rows(&j, out);
        Py_END_ALLOW_THREADS
    }
    if (rc == 0)
        result = Py_BuildValue("(Oiiiiii)", pixels, (int)j.x, (int)j.y, (int)j.w, (int)j.h,
                               (int)j.width, (int)j.height);
    jpeg_destroy_decompress(&j.cinfo);
    PyBuffer_Release(&data);
    Py_XDECREF(pixels);
    if (result == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "decode(data, m, x0, y0, x1, y1, pad, max_pixels) -> "
     "(pixels, x, y, w, h, width, height) | None: the window of a JPEG at scale m/8, RGBX"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegcrop", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
